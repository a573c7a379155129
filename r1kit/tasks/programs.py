"""Small programming problems: a Python function from a template family, hidden tests generated
with it. Difficulty d draws from the families of level <= d; tests grow with d.

Expected outputs come from our own reference solution, run here (trusted code we wrote); the
candidate's code only ever runs in the sandbox.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

from r1kit.tasks.base import Task, make_sample


@dataclass
class Family:
    level: int
    make: Callable[[random.Random], tuple[str, str, str, Callable[[random.Random], tuple]]]
    # make(rng) -> (signature, description, reference source, input generator)


def _ints(rng, n_max=8, lo=-20, hi=20):
    return [rng.randint(lo, hi) for _ in range(rng.randint(0, n_max))]


def _word(rng, n_max=12, letters=string.ascii_lowercase):
    return "".join(rng.choice(letters) for _ in range(rng.randint(0, n_max)))


def _sum_multiples(rng):
    m = rng.randint(2, 7)
    return ("sum_multiples(xs)", f"returns the sum of the elements of the list xs that are divisible by {m}",
            f"def sum_multiples(xs):\n    return sum(x for x in xs if x % {m} == 0)\n",
            lambda r: (_ints(r),))


def _count_char(rng):
    c = rng.choice("aeiou")
    return ("count_char(s)", f"returns how many times the letter '{c}' appears in the string s, ignoring case",
            f"def count_char(s):\n    return s.lower().count('{c}')\n",
            lambda r: (_word(r, 15, "aeiouAEIOUbcdxyz "),))


def _scale_shift(rng):
    a, b = rng.randint(2, 5), rng.randint(-5, 5)
    return ("scale_shift(xs)", f"returns a new list where each element x of xs becomes x * {a} + {b}",
            f"def scale_shift(xs):\n    return [x * {a} + {b} for x in xs]\n",
            lambda r: (_ints(r),))


def _nth_term(rng):
    s0, a, b = rng.randint(0, 5), rng.randint(1, 3), rng.randint(-3, 4)
    return ("nth_term(n)", f"returns term n (n >= 0) of the sequence that starts at {s0} and where each term is "
            f"{a} times the previous one plus {b}",
            f"def nth_term(n):\n    t = {s0}\n    for _ in range(n):\n        t = {a} * t + {b}\n    return t\n",
            lambda r: (r.randint(0, 12),))


def _longest_run(rng):
    return ("longest_run(xs)", "returns the length of the longest run of equal consecutive elements of xs "
            "(0 for an empty list)",
            "def longest_run(xs):\n    best = cur = 0\n    for i, x in enumerate(xs):\n"
            "        cur = cur + 1 if i and xs[i - 1] == x else 1\n        best = max(best, cur)\n    return best\n",
            lambda r: ([r.randint(0, 2) for _ in range(r.randint(0, 12))],))


def _caesar(rng):
    k = rng.randint(1, 25)
    return ("caesar(s)", f"shifts each lowercase letter of s forward by {k} places in the alphabet, wrapping from z "
            "to a, and leaves every other character unchanged",
            f"def caesar(s):\n    return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)\n",
            lambda r: (_word(r, 15, string.ascii_lowercase + " .A"),))


def _count_primes(rng):
    return ("count_primes(n)", "returns how many prime numbers are smaller than n",
            "def count_primes(n):\n    return sum(all(p % d for d in range(2, int(p ** 0.5) + 1)) for p in range(2, n))\n",
            lambda r: (r.randint(0, 200),))


def _run_length(rng):
    return ("run_length(s)", "returns the run-length encoding of s: each run of a repeated character becomes the "
            "character followed by the run length, e.g. 'aaab' -> 'a3b1'",
            "def run_length(s):\n    out, i = [], 0\n    while i < len(s):\n        j = i\n"
            "        while j < len(s) and s[j] == s[i]:\n            j += 1\n        out.append(s[i] + str(j - i))\n"
            "        i = j\n    return ''.join(out)\n",
            lambda r: ("".join(r.choice("ab") * r.randint(1, 4) for _ in range(r.randint(0, 5))),))


def _second_largest(rng):
    return ("second_largest(xs)", "returns the second largest distinct value in xs, or None when xs has fewer than "
            "two distinct values",
            "def second_largest(xs):\n    v = sorted(set(xs))\n    return v[-2] if len(v) >= 2 else None\n",
            lambda r: (_ints(r, 8, -5, 5),))


def _balanced(rng):
    return ("balanced(s)", "returns True when the brackets (), [] and {} in s are balanced and properly nested, "
            "else False",
            "def balanced(s):\n    pairs, stack = {')': '(', ']': '[', '}': '{'}, []\n    for c in s:\n"
            "        if c in '([{':\n            stack.append(c)\n        elif c in pairs:\n"
            "            if not stack or stack.pop() != pairs[c]:\n                return False\n    return not stack\n",
            lambda r: ("".join(r.choice("()[]{}") for _ in range(r.randint(0, 8))),))


FAMILIES = [Family(1, _sum_multiples), Family(1, _count_char), Family(1, _scale_shift), Family(2, _nth_term),
            Family(2, _longest_run), Family(2, _caesar), Family(3, _count_primes), Family(3, _run_length),
            Family(3, _second_largest), Family(3, _balanced)]


class CodeTask(Task):
    name = "code"

    def __init__(self, difficulty: int = 1, n_tests: int | None = None):
        super().__init__(difficulty)
        self.n_tests = n_tests or 4 + 2 * difficulty
        self.families = [f for f in FAMILIES if f.level <= difficulty]

    def sample(self, rng: random.Random) -> dict:
        family = rng.choice(self.families)
        signature, description, source, inputs = family.make(rng)
        entry_point = signature.split("(")[0]
        namespace: dict = {}
        exec(compile(source, f"<reference {entry_point}>", "exec"), namespace)  # our own code, not model text
        reference = namespace[entry_point]
        lines = ["def check(candidate):"]
        seen = set()
        for _ in range(self.n_tests * 3):
            args = inputs(rng)
            if repr(args) in seen:
                continue
            seen.add(repr(args))
            lines.append(f"    assert candidate({', '.join(map(repr, args))}) == {reference(*args)!r}")
            if len(lines) > self.n_tests:
                break
        tests = "\n".join(lines) + "\n"
        prompt = f"Write a Python function {signature} that {description}."
        return make_sample(prompt, tests, self.name, test=tests, entry_point=entry_point, solution=source)

    def verify(self, answer_text: str, sample: dict) -> bool:
        from r1kit.tasks.code_tests import extract_code, run_tests

        code = extract_code(answer_text)
        return code is not None and run_tests(code, sample["meta"]["test"], sample["meta"]["entry_point"]).all_passed

    def worked_solution(self, sample: dict, rng: random.Random | None = None, sloppy: bool = False) -> tuple[str, str]:
        return f"I write {sample['meta']['entry_point']}.", f"```python\n{sample['meta']['solution']}```"
