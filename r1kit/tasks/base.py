"""The Sample shape every task generator and loader yields, and the base of the generators."""
from __future__ import annotations

import random
import re
from typing import Any

Sample = dict  # {"prompt": str, "answer": Any, "task": str, "meta": dict}


def make_sample(prompt: str, answer: Any, task: str, **meta: Any) -> dict:
    return {"prompt": prompt, "answer": answer, "task": task, "meta": meta}


def validate_sample(sample: Any, where: str = "sample") -> dict:
    """Check the Sample shape; a clear ValueError naming `where` and the field otherwise."""
    if not isinstance(sample, dict):
        raise ValueError(f"{where}: a sample must be a dict with prompt/answer/task/meta, got {type(sample).__name__}")
    for key, kind in (("prompt", str), ("task", str)):
        if key not in sample:
            raise ValueError(f"{where}: missing field {key!r}")
        if not isinstance(sample[key], kind):
            raise ValueError(f"{where}: field {key!r} must be {kind.__name__}, got {type(sample[key]).__name__}")
    if sample.get("answer") is None:
        raise ValueError(f"{where}: missing field 'answer' (the reference the reward checks against)")
    if not isinstance(sample.get("meta", {}), dict):
        raise ValueError(f"{where}: field 'meta' must be a dict, got {type(sample['meta']).__name__}")
    return sample


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: Any) -> float | None:
    """'1,234' / '$42' / '-7.50' / ' 12. ' -> a number; None when the text is not one number."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    if not isinstance(text, str):
        return None
    t = text.strip().strip(".").replace("$", "").replace("\\$", "").replace("\\!", "").strip()
    if not re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?|-?\d+(\.\d+)?|-?\.\d+", t):
        return None
    try:
        return float(t.replace(",", ""))
    except ValueError:
        return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text or "")
    return found[-1].rstrip(",") if found else None


def answer_part(text: str) -> str:
    """What a task's verifier should read: the <answer> contents or the text after </think>."""
    from r1kit.tokenizer import split_reasoning

    split = split_reasoning(text)
    body = split.answer if split.closed or split.reasoning is None else ""
    m = re.search(r"<answer>(.*?)</answer>", body, re.S)
    return (m.group(1) if m else body).strip()


class Task:
    """A seeded, unlimited problem source with its own verifier.

    Subclasses set `name` and implement `sample(rng)` and `verify(answer_text, sample)`.
    `generate(n, seed)` is deterministic: the same (n, seed, difficulty) gives the same samples.
    """

    name = "task"

    def __init__(self, difficulty: int = 1):
        if not isinstance(difficulty, int) or difficulty < 1:
            raise ValueError(f"task {self.name!r}: difficulty must be a positive int, got {difficulty!r}")
        self.difficulty = difficulty

    def sample(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def generate(self, n: int, seed: int = 0) -> list[dict]:
        rng = random.Random(f"{self.name}-{self.difficulty}-{seed}")
        return [self.sample(rng) for _ in range(n)]

    def stream(self, seed: int = 0):
        """Unlimited samples."""
        rng = random.Random(f"{self.name}-{self.difficulty}-{seed}")
        while True:
            yield self.sample(rng)

    def verify(self, answer_text: str, sample: dict) -> bool:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(difficulty={self.difficulty})"
