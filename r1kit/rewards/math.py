"""Math accuracy: the final answer checked for equivalence with the reference.

Plain numbers are compared directly (fast, and most generated tasks are integers); anything else
goes to math-verify (LaTeX and sympy equivalence). math-verify's time limits use SIGALRM, which
only works in the main thread: there we call it directly; from any other thread the check runs
in a one-process pool (its main thread has the signal), with a hard wait limit from here.
"""
from __future__ import annotations

import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import lru_cache

from r1kit.rewards.extract import answer_region, final_answer
from r1kit.tasks.base import parse_number

TIMEOUT_S = 3  # per parse / per verify (math-verify takes whole seconds)


def _numbers_equal(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    parsed = parse(f"${gold}$", extraction_config=cfg, parsing_timeout=timeout_s)
    return parsed or parse(gold, extraction_config=cfg, parsing_timeout=timeout_s)


def _verify_here(gold: str, prediction: str, wrapped: bool, timeout_s: int) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = _parse_gold(gold, timeout_s)
    text = f"${prediction}$" if wrapped else prediction
    pred = parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=timeout_s)
    if not gold_parsed or not pred:
        return False
    return bool(verify(gold_parsed, pred, timeout_seconds=timeout_s))


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _verify_pool() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            import multiprocessing

            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return _pool


def equivalent(gold: str, prediction: str, *, wrapped: bool = True, timeout_s: int = TIMEOUT_S) -> bool:
    """Is `prediction` the same mathematical answer as `gold`? False on any failure or timeout."""
    g, p = parse_number(gold), parse_number(prediction)
    if g is not None and p is not None:
        return _numbers_equal(g, p)
    try:
        if threading.current_thread() is threading.main_thread():
            return _verify_here(gold, prediction, wrapped, timeout_s)
        future = _verify_pool().submit(_verify_here, gold, prediction, wrapped, timeout_s)
        return bool(future.result(timeout=3 * timeout_s + 10))
    except (FutureTimeout, Exception):
        return False


def math_reward(completion: str, answer, *, last_number_fallback: bool = True,
                prompt_opened_think: bool | None = None, timeout_s: int = TIMEOUT_S) -> float:
    """1.0 when the completion's final answer equals `answer` (the reference), else 0.0."""
    try:
        region, tagged = answer_region(completion, prompt_opened_think)
        if region is None:
            return 0.0
        gold = str(answer).strip()
        numeric_gold = parse_number(gold) is not None
        # the last-number fallback only makes sense for a numeric reference
        cand = final_answer(region, tagged=tagged, last_number_fallback=last_number_fallback and numeric_gold)
        if cand is not None:
            return 1.0 if equivalent(gold, cand, timeout_s=timeout_s) else 0.0
        if not numeric_gold:
            # no box and no tag: let math-verify find the LaTeX answer in the text itself
            return 1.0 if equivalent(gold, region, wrapped=False, timeout_s=timeout_s) else 0.0
        return 0.0
    except Exception:
        return 0.0
