"""Multi-digit arithmetic: a + b, a - b (a >= b), a * d (d one digit). Difficulty = digits.

`worked_solution` writes the school method column by column ("7+9=16 write 6 carry 1; ...");
`sloppy=True` is a systematic wrong solver that forgets every carry (and every borrow), the kind
of wrong mode that survives a low sampling temperature and that GRPO then removes.
"""
from __future__ import annotations

import random

from r1kit.tasks.base import Task, answer_part, make_sample, parse_number

OPS = ("+", "-", "*")


class ArithmeticTask(Task):
    name = "arithmetic"

    def __init__(self, difficulty: int = 3, ops: tuple[str, ...] | str = ("+",)):
        super().__init__(difficulty)
        ops = tuple(ops)
        bad = [o for o in ops if o not in OPS]
        if not ops or bad:
            raise ValueError(f"task 'arithmetic': ops must be drawn from {OPS}, got {ops!r}")
        self.ops = ops

    def sample(self, rng: random.Random) -> dict:
        op = rng.choice(self.ops)
        lo, hi = 10 ** (self.difficulty - 1), 10 ** self.difficulty - 1
        a = rng.randint(lo, hi)
        b = rng.randint(2, 9) if op == "*" else rng.randint(lo, hi)
        if op == "-" and b > a:
            a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return make_sample(f"What is {a}{op}{b}?", str(value), self.name, a=a, b=b, op=op)

    def verify(self, answer_text: str, sample: dict) -> bool:
        got = parse_number(answer_part(answer_text))
        return got is not None and got == float(sample["answer"])

    def worked_solution(self, sample: dict, rng: random.Random | None = None, sloppy: bool = False) -> tuple[str, str]:
        m = sample["meta"]
        steps, digits = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}[m["op"]](m["a"], m["b"], sloppy)
        answer = str(int("".join(reversed(digits))))
        return "; ".join(steps), answer


def _cols(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def _add_steps(a: int, b: int, sloppy: bool):
    xa, xb = _cols(a), _cols(b)
    steps, digits, carry = [], [], 0
    for i in range(max(len(xa), len(xb))):
        x = xa[i] if i < len(xa) else 0
        y = xb[i] if i < len(xb) else 0
        s = x + y + carry
        expr = f"{x}+{y}" + (f"+{carry}" if carry else "")
        d, carry = s % 10, (0 if sloppy else s // 10)
        steps.append(f"{expr}={s} write {d}" + (" carry 1" if carry else ""))
        digits.append(str(d))
    if carry:
        steps.append("write 1")
        digits.append("1")
    return steps, digits


def _sub_steps(a: int, b: int, sloppy: bool):
    xa, xb = _cols(a), _cols(b)
    steps, digits, borrow = [], [], 0
    for i in range(len(xa)):
        y = xb[i] if i < len(xb) else 0
        s = xa[i] - y - borrow
        expr = f"{xa[i]}-{y}" + (f"-{borrow}" if borrow else "")
        d = s % 10
        borrow = 1 if s < 0 and not sloppy else 0
        steps.append(f"{expr}={s} write {d}" + (" borrow 1" if borrow else ""))
        digits.append(str(d))
    return steps, digits


def _mul_steps(a: int, b: int, sloppy: bool):
    steps, digits, carry = [], [], 0
    for x in _cols(a):
        s = x * b + carry
        expr = f"{x}*{b}" + (f"+{carry}" if carry else "")
        d, carry = s % 10, (0 if sloppy else s // 10)
        steps.append(f"{expr}={s} write {d}" + (f" carry {carry}" if carry else ""))
        digits.append(str(d))
    if carry:
        steps.append(f"write {carry}")
        digits.append(str(carry))
    return steps, digits
