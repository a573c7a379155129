"""Multiple choice: the answer's letter equals the reference letter."""
from __future__ import annotations

import re

from r1kit.rewards.extract import answer_region, boxed_contents

_LETTER = r"\(?\s*(?:\\text\{)?\s*([A-J])\s*\}?\s*\)?"


def choice_letter(region: str) -> str | None:
    boxed = boxed_contents(region)
    if boxed:
        letters = {m.group(1) for b in boxed if (m := re.fullmatch(r"\s*" + _LETTER + r"\s*\.?\s*", b))}
        return letters.pop() if len(letters) == 1 and len(boxed) == len([b for b in boxed if b]) else None
    m = re.fullmatch(r"\s*" + _LETTER + r"\s*[.:)]?\s*", region)
    if m:
        return m.group(1)
    found = re.findall(r"(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*" + _LETTER, region, re.I)
    return found[-1].upper() if found and len({f.upper() for f in found}) == 1 else None


def choice_reward(completion: str, answer: str, *, prompt_opened_think: bool | None = None) -> float:
    try:
        region, _ = answer_region(completion, prompt_opened_think)
        if region is None:
            return 0.0
        gold = re.sub(r"[^A-J]", "", str(answer).replace("boxed", "").upper())[:1]
        return 1.0 if gold and choice_letter(region) == gold else 0.0
    except Exception:
        return 0.0
