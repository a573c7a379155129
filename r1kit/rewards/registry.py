"""Rewards by name, the task-dispatching "accuracy" reward, weighted combination and batch scoring."""
from __future__ import annotations

import math as _math
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable

from r1kit.rewards.choice import choice_reward
from r1kit.rewards.code import code_reward
from r1kit.rewards.countdown import countdown_reward
from r1kit.rewards.format import format_reward
from r1kit.rewards.language import language_reward
from r1kit.rewards.length import make_length_reward
from r1kit.rewards.math import math_reward
from r1kit.rewards.result import RewardResult
from r1kit.tasks.base import validate_sample

MATH_TASKS = ("arithmetic", "word_problems", "math")
ACCURACY_TASKS = ("countdown", *MATH_TASKS, "multiple_choice", "code")


def _opened(sample: dict):
    return (sample.get("meta") or {}).get("prompt_opened_think")


def accuracy_reward(completion: str, sample: dict) -> float:
    """Is the answer right? Dispatches on sample["task"]."""
    validate_sample(sample)
    task, meta = sample["task"], sample.get("meta") or {}
    if task == "countdown":
        return countdown_reward(completion, sample)
    if task in MATH_TASKS:
        return math_reward(completion, sample["answer"], prompt_opened_think=_opened(sample))
    if task == "multiple_choice":
        return choice_reward(completion, sample["answer"], prompt_opened_think=_opened(sample))
    if task == "code":
        entry = meta.get("entry_point")
        tests = meta.get("test", sample["answer"])
        return code_reward(completion, tests, entry, prefix=sample["prompt"] if entry else None,
                           fraction=bool(meta.get("fraction", False)))
    raise ValueError(f"accuracy reward: unknown task {task!r} in sample; known tasks: {', '.join(ACCURACY_TASKS)}")


def _field_reward(fn, completion, sample):
    validate_sample(sample)
    return fn(completion, sample["answer"], prompt_opened_think=_opened(sample))


REWARDS: dict[str, Callable] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "format_r1": partial(format_reward, style="r1"),
    "format_r1_zero": partial(format_reward, style="r1_zero"),
    "math": partial(_field_reward, math_reward),
    "multiple_choice": partial(_field_reward, choice_reward),
    "countdown": countdown_reward,
    "code": lambda c, s: accuracy_reward(c, {**s, "task": "code"}),
    "language": language_reward,
    "length": make_length_reward(),
}


def get_reward(name: str, **options) -> Callable[[str, dict], float]:
    """A reward `fn(completion, sample) -> float` by name; `options` configure it (e.g. length's
    max_length/buffer, language's language, format's style)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    if not options:
        return REWARDS[name]
    if name == "length":
        return make_length_reward(**options)
    return partial(REWARDS[name], **options)


def combine(weights: dict[str, float], options: dict[str, dict] | None = None) -> Callable[[str, dict], RewardResult]:
    """Σ w_i r_i / Σ w_i over rewards named in `weights` (e.g. {"accuracy": 1, "format": 1}, R1's
    equal weighting); the result carries every sub-score in `parts`."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError("combine: weights must be a non-empty dict of reward name -> weight")
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or w < 0 or _math.isnan(w):
            raise ValueError(f"combine: weight of {name!r} must be a number >= 0, got {w!r}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError("combine: the weights sum to 0")
    fns = {name: get_reward(name, **(options or {}).get(name, {})) for name in weights}

    def combined(completion: str, sample: dict) -> RewardResult:
        parts = {name: float(fn(completion, sample)) for name, fn in fns.items()}
        return RewardResult(sum(weights[n] * parts[n] for n in parts) / total, parts)

    combined.weights = dict(weights)
    return combined


def _safe(reward_fn, completion, sample) -> RewardResult:
    try:
        out = reward_fn(completion, sample)
        result = out if isinstance(out, RewardResult) else RewardResult(float(out), {})
    except Exception as e:  # noqa: BLE001 - a failing reward scores 0 and is reported, never crashes a run
        return RewardResult(0.0, {}, error=f"{type(e).__name__}: {e}"[:500])
    if not _math.isfinite(result.score):
        return RewardResult(0.0, result.parts, error=f"reward returned {result.score}")
    result.score = min(1.0, max(0.0, float(result.score)))
    return result


def score_batch(reward_fn: Callable, completions: list[str], samples: list[dict],
                workers: int | None = None) -> list[RewardResult]:
    """Score many completions. Code samples run on a thread pool (each waits on a sandboxed
    process) while everything else runs here, in this thread: math-verify's signal-based time
    limits need the main thread (elsewhere r1kit.rewards.math moves them to a process)."""
    if len(completions) != len(samples):
        raise ValueError(f"score_batch: {len(completions)} completions but {len(samples)} samples")
    from r1kit import sandbox

    results: list[RewardResult | None] = [None] * len(samples)
    code_idx = [i for i, s in enumerate(samples) if isinstance(s, dict) and s.get("task") == "code"]
    pool = ThreadPoolExecutor(max_workers=workers or sandbox.default_workers()) if code_idx else None
    try:
        futures = {i: pool.submit(_safe, reward_fn, completions[i], samples[i]) for i in code_idx} if pool else {}
        for i in range(len(samples)):
            if i not in futures:
                results[i] = _safe(reward_fn, completions[i], samples[i])
        for i, f in futures.items():
            results[i] = f.result()
    finally:
        if pool:
            pool.shutdown(wait=True)
    return results  # type: ignore[return-value]


def count_errors(results: list[RewardResult]) -> int:
    return sum(r.error is not None for r in results)
