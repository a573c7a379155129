"""Format: is the completion in the R1 form (thinking closed by </think>, then a non-empty answer)
or the R1-Zero form (<think>...</think> <answer>...</answer>)? 1.0 or 0.0.

A `<think>` opened by the prompt (R1's generation prompt ends in it) is handled exactly as
r1kit.tokenizer.split_reasoning handles it: the completion then holds only `</think>`.
"""
from __future__ import annotations

import re

from r1kit.tokenizer import THINK_CLOSE, THINK_OPEN, split_reasoning

STYLES = ("any", "r1", "r1_zero")


def _r1(completion: str, prompt_opened_think: bool | None) -> bool:
    split = split_reasoning(completion, prompt_opened_think)
    if not split.closed or not split.reasoning:
        return False
    # exactly one thinking section, no tags of any kind left in the answer
    if completion.count(THINK_CLOSE) != 1 or completion.count(THINK_OPEN) > 1:
        return False
    return bool(split.answer) and not re.search(r"</?(think|answer)>", split.answer)


def _r1_zero(completion: str, prompt_opened_think: bool | None) -> bool:
    split = split_reasoning(completion, prompt_opened_think)
    if not split.closed or not split.reasoning:
        return False
    if completion.count(THINK_CLOSE) != 1 or completion.count(THINK_OPEN) > 1:
        return False
    m = re.fullmatch(r"<answer>(.*?)</answer>", split.answer, re.S)
    return bool(m) and bool(m.group(1).strip()) and not re.search(r"</?(think|answer)>", m.group(1))


def format_reward(completion: str, sample: dict | None = None, *, style: str = "any",
                  prompt_opened_think: bool | None = None) -> float:
    """1.0 when the completion is in the R1 (`style="r1"`) or R1-Zero (`"r1_zero"`) form; "any": either."""
    if style not in STYLES:
        raise ValueError(f"format_reward: style {style!r} is not one of {STYLES}")
    if not isinstance(completion, str):
        return 0.0
    if prompt_opened_think is None and isinstance(sample, dict):
        prompt_opened_think = (sample.get("meta") or {}).get("prompt_opened_think")
    try:
        ok = ((style in ("any", "r1") and _r1(completion, prompt_opened_think))
              or (style in ("any", "r1_zero") and _r1_zero(completion, prompt_opened_think)))
    except Exception:
        ok = False
    return 1.0 if ok else 0.0
