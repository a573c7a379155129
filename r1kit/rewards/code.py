"""Code accuracy: run the completion's program against the tests in the sandbox.

All-or-nothing (R1: passes every test case) or the fraction of asserts passed. Tests are either
plain asserts or HumanEval's `def check(candidate)` with an `entry_point`. The harness (see
r1kit.tasks.code_tests) makes early exits, self-defined `check`s and always-equal objects fail.
"""
from __future__ import annotations

import re
import textwrap

from r1kit.tasks.code_tests import extract_code, run_tests


def program_for(completion: str, prefix: str | None = None, entry_point: str | None = None) -> str | None:
    """The code to test: the completion's code, after `prefix` (a HumanEval prompt) when the code
    does not define `entry_point` itself (a body-only continuation of the prompt)."""
    if not isinstance(completion, str):
        return None
    code = extract_code(completion)
    if code is None and prefix and "</think>" not in completion and "<answer>" not in completion:
        code = completion if completion.strip() else None  # a raw continuation of the prompt
    if code is None:
        return None
    if prefix and entry_point and not re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        return prefix + code
    return textwrap.dedent(code)


def code_reward(completion: str, tests: str, entry_point: str | None = None, *, fraction: bool = False,
                prefix: str | None = None, timeout_s: float = 10.0, memory_mb: int = 1024) -> float:
    """1.0 when every test passes (or, with `fraction=True`, the share that passed)."""
    try:
        if not isinstance(tests, str) or not tests.strip():
            raise ValueError("code_reward: tests must be a non-empty string of Python test code")
        code = program_for(completion, prefix, entry_point)
        if code is None:
            return 0.0
        report = run_tests(code, tests, entry_point, fraction=fraction, timeout_s=timeout_s, memory_mb=memory_mb)
        return report.fraction if fraction else float(report.all_passed)
    except ValueError:
        raise
    except Exception:
        return 0.0
