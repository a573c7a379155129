"""Length shaping: DAPO's soft overlong penalty, shifted into [0, 1].

DAPO: 0 up to max_length - buffer, then linear down to -1 at max_length (and -1 beyond). Here
1 + that, so a reward of 1 means "not too long" and 0 means "at or over the limit". Length is
measured by `length_fn` (characters by default; pass a tokenizer's `len(encode(...))`)."""
from __future__ import annotations

from typing import Callable


def soft_overlong(length: int, max_length: int, buffer: int) -> float:
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"length reward: need 0 < buffer <= max_length, got buffer={buffer} max_length={max_length}")
    expected = max_length - buffer
    if length <= expected:
        return 1.0
    return max(0.0, 1.0 - (length - expected) / buffer)


def make_length_reward(max_length: int = 4096, buffer: int = 1024,
                       length_fn: Callable[[str], int] = len) -> Callable[[str, dict], float]:
    def length_reward(completion: str, sample: dict | None = None) -> float:
        n = (sample or {}).get("meta", {}).get("completion_length") if isinstance(sample, dict) else None
        return soft_overlong(int(n) if n is not None else length_fn(completion if isinstance(completion, str) else ""),
                             max_length, buffer)

    return length_reward
