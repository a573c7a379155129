"""Countdown accuracy: the answer is an expression using each number exactly once that equals the
target (parsed by an AST walk in r1kit.tasks.countdown, never eval'ed)."""
from __future__ import annotations

from r1kit.rewards.extract import answer_region
from r1kit.tasks.countdown import check


def countdown_reward(completion: str, sample: dict, *, format_score: float = 0.0) -> float:
    """1.0 correct; `format_score` (TinyZero used 0.1) for a well-formed but wrong expression; 0 otherwise."""
    meta = sample.get("meta") or {}
    if "numbers" not in meta or "target" not in meta:
        raise ValueError("countdown sample: meta must hold 'numbers' and 'target'")
    try:
        region, _ = answer_region(completion, meta.get("prompt_opened_think"))
        if region is None:
            return 0.0
        well_formed, correct = check(region, list(meta["numbers"]), int(meta["target"]))
        return 1.0 if correct else (format_score if well_formed else 0.0)
    except Exception:
        return 0.0
