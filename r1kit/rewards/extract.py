"""Where the answer is in a completion, and what it says. Never raises on model text.

The answer comes only from after `</think>` (r1kit.tokenizer.split_reasoning decides), so an
answer written inside the thinking earns nothing; a completion cut off inside the thinking has no
answer; stray or repeated `<think>`/`</think>`/`<answer>` tags void the answer.
"""
from __future__ import annotations

import re

from r1kit.tokenizer import split_reasoning


def answer_region(completion: str, prompt_opened_think: bool | None = None) -> tuple[str | None, bool]:
    """(answer text or None, came from <answer> tags)."""
    if not isinstance(completion, str):
        return None, False
    split = split_reasoning(completion, prompt_opened_think)
    if split.reasoning is not None and not split.closed:
        return None, False  # truncated inside the thinking
    ans = split.answer
    if "<think>" in ans or "</think>" in ans:
        return None, False  # a second round of tags: "</think> x </think> y"
    tagged = "<answer>" in ans or "</answer>" in ans
    if tagged:
        m = re.search(r"<answer>(.*?)</answer>\s*$", ans, re.S)
        if ans.count("<answer>") != 1 or ans.count("</answer>") != 1 or not m:
            return None, True
        ans = m.group(1)
    ans = ans.strip()
    return (ans or None), tagged


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every \boxed{...} / \fbox{...}, braces matched."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1].strip())
    return out


def _norm(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$.")


def final_answer(text: str, *, tagged: bool = False, last_number_fallback: bool = True) -> str | None:
    r"""The final answer in an answer region: the \boxed{} (several different ones: None), the
    `#### N`, the whole <answer> contents, or (optionally) the last number."""
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1] if len({_norm(b) for b in boxed}) == 1 and boxed[-1] else None
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
        return hashes[-1].strip()
    if tagged:
        return text.strip()
    if last_number_fallback:
        nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
        return nums[-1].rstrip(",.") if nums else None
    return None
