"""Countdown (TinyZero's task): reach a target with + - * / using each given number once.

Two forms of problem, both checked by the same verifier:
    form="any"      `difficulty + 2` numbers combined left to right with random operators
    form="add_sub"  three numbers in 1..max_number, target = x + y - z: the easiest countdown, one a
                    tiny model learns in minutes. Its worked solution is a short mechanical search
                    that tries the pairs in prompt order ("4+3=7 7-5=2; 4+5=9 9-3=6"), so every step
                    is a one-digit table look-up and the decision is a comparison with the target.
    form="mul_add"  three numbers in 2..max_number, target = x*y + z or x*y - z, the same search
                    ("4*3=12 12+5=17; 4*5=20 20-3=17"); a 0.8M model needs far longer to learn it.
`worked_solution(..., sloppy=True)` is a systematic wrong solver (adds everything), the wrong mode
the R1-Zero bench's base keeps at temperature 0.6 and GRPO removes.

The model's expression is parsed with an AST walk that admits only integer literals, the four
operators and parentheses, and is evaluated exactly with Fractions: model text is never `eval`ed.
"""
from __future__ import annotations

import ast
import random
from fractions import Fraction

from r1kit.tasks.base import Task, answer_part, make_sample

MAX_EXPRESSION_CHARS = 200
FORMS = ("any", "add_sub", "mul_add")
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def parse_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """(value, integer literals used) of an arithmetic expression, or None if it is not one."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval")
        used: list[int] = []
        return _eval(tree.body, used), used
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError, OverflowError, TypeError):
        return None


def _eval(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left, used), _eval(node.right, used)
        op = type(node.op)
        value = (left + right if op is ast.Add else left - right if op is ast.Sub
                 else left * right if op is ast.Mult else left / right)
        if abs(value) > 10**12:
            raise ValueError("value too large")
        return value
    raise ValueError(f"not allowed in a countdown expression: {type(node).__name__}")


def expression_of(answer_text: str) -> str:
    """The expression part of an answer: '(3+5)*7 = 56' -> '(3+5)*7'."""
    return answer_text.split("=")[0].strip()


def check(answer_text: str, numbers: list[int], target: int) -> tuple[bool, bool]:
    """(well_formed, correct): correct means each number used exactly once and the value is the target."""
    parts = [p.strip() for p in answer_text.split("=")]
    parsed = parse_expression(parts[0])
    if parsed is None:
        return False, False
    value, used = parsed
    # a claimed result after '=' must be the target too (no "3+5+7 = 56")
    rhs_ok = all(p == str(target) for p in parts[1:])
    return True, rhs_ok and value == target and sorted(used) == sorted(numbers)


class CountdownTask(Task):
    name = "countdown"

    def __init__(self, difficulty: int = 1, max_number: int = 20, max_target: int = 999, form: str = "any"):
        super().__init__(difficulty)
        if form not in FORMS:
            raise ValueError(f"task 'countdown': form must be one of {', '.join(FORMS)}, got {form!r}")
        if form != "any" and (difficulty != 1 or max_number < 3):
            raise ValueError(f"task 'countdown': form={form!r} has three numbers (difficulty = 1) up to max_number "
                             f"(max_number >= 3), got difficulty={difficulty}, max_number={max_number}")
        self.count = difficulty + 2  # 3 numbers at difficulty 1
        self.max_number, self.max_target, self.form = max_number, max_target, form

    def sample(self, rng: random.Random) -> dict:
        if self.form != "any":
            return self._sample_pair_search(rng)
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            built = _build(numbers, rng, self.max_target)
            if built is not None:
                break
        expr, steps, target = built
        shown = numbers[:]
        rng.shuffle(shown)  # the generating order would give the solution away
        prompt = f"Make {target} from {' '.join(map(str, shown))} using + - * /, each once."
        return make_sample(prompt, target, self.name, numbers=shown, target=target, solution=expr, steps=steps)

    def _sample_pair_search(self, rng: random.Random) -> dict:
        while True:
            if self.form == "add_sub":
                x, y, z = (rng.randint(1, self.max_number) for _ in range(3))
                target = x + y - z
            else:
                x, y, z = (rng.randint(2, self.max_number) for _ in range(3))
                target = x * y + z if rng.random() < 0.5 else x * y - z
            # the sloppy solver's sum must be wrong, so that its answers are never right by luck
            if 0 < target <= self.max_target and target != x + y + z:
                break
        shown = [x, y, z]
        rng.shuffle(shown)
        steps, solution = search_pairs(shown, target, "+" if self.form == "add_sub" else "*")
        prompt = f"Make {target} from {' '.join(map(str, shown))} using + - * /, each once."
        return make_sample(prompt, target, self.name, numbers=shown, target=target, solution=solution, steps=steps)

    def verify(self, answer_text: str, sample: dict) -> bool:
        m = sample["meta"]
        return check(answer_part(answer_text), m["numbers"], m["target"])[1]

    def worked_solution(self, sample: dict, rng: random.Random | None = None, sloppy: bool = False) -> tuple[str, str]:
        m = sample["meta"]
        if not sloppy:
            if "solution" in m:
                return "; ".join(m["steps"]), m["solution"]
            found = solve(m["numbers"], m["target"])
            if found is None:
                raise ValueError(f"countdown sample has no solution: {m['numbers']} -> {m['target']}")
            return "; ".join(found[1]), found[0]
        # the systematic wrong solver: adds everything left to right; never hits the target by luck
        nums = list(m["numbers"])
        if sum(nums) == m["target"]:
            nums.append(nums[0])  # ... and when the sum would be right, it reuses a number
        steps, total = [], nums[0]
        for n in nums[1:]:
            steps.append(f"{total}+{n}={total + n}")
            total += n
        # written like one candidate of the mul_add search, so the two modes part at the first operator
        return (" " if self.form != "any" else "; ").join(steps), "+".join(map(str, nums))


def search_pairs(numbers: list[int], target: int, first_op: str) -> tuple[list[str], str]:
    """The worked solution of the three-number forms: try the pairs in the order shown, (a,b) (a,c)
    (b,c); combine the pair with `first_op` ("+" or "*"), then add the third number if that is below
    the target, else subtract it; stop at the first candidate that hits the target.
    Returns (one step per candidate tried, the expression found)."""
    steps = []
    for i, j, k in ((0, 1, 2), (0, 2, 1), (1, 2, 0)):
        x, y, z = numbers[i], numbers[j], numbers[k]
        first = x * y if first_op == "*" else x + y
        op = "+" if first < target else "-"
        value = first + z if op == "+" else first - z
        steps.append(f"{x}{first_op}{y}={first} {first}{op}{z}={value}")
        if value == target:
            return steps, f"{x}{first_op}{y}{op}{z}"
    raise ValueError(f"countdown: {numbers} -> {target} is not of the form x{first_op}y+z or x{first_op}y-z")


def _apply(a: int, op: str, b: int) -> int | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b
    return a // b if b > 1 and a % b == 0 else None


def _build(numbers: list[int], rng: random.Random, max_target: int):
    """A random left-to-right solution over all numbers: (expression, steps, target) or None."""
    order = numbers[:]
    rng.shuffle(order)
    expr, value, last_op, steps = str(order[0]), order[0], None, []
    for n in order[1:]:
        ops = ["+", "-", "*", "/"]
        rng.shuffle(ops)
        for op in ops:
            new = _apply(value, op, n)
            if new is not None and 0 < new <= max_target:
                break
        else:
            return None
        if op in "*/" and last_op in ("+", "-"):
            expr = f"({expr})"
        steps.append(f"{value}{op}{n}={new}")
        expr, value, last_op = f"{expr}{op}{n}", new, op
    return expr, steps, value


def solve(numbers: list[int], target: int):
    """Exhaustive left-fold search (small inputs): (expression, steps) or None."""
    import itertools

    for order in itertools.permutations(numbers):
        for ops in itertools.product("+-*/", repeat=len(order) - 1):
            value, expr, last, steps = order[0], str(order[0]), None, []
            for op, n in zip(ops, order[1:]):
                new = _apply(value, op, n)
                if new is None:
                    break
                if op in "*/" and last in ("+", "-"):
                    expr = f"({expr})"
                steps.append(f"{value}{op}{n}={new}")
                value, expr, last = new, f"{expr}{op}{n}", op
            else:
                if value == target:
                    return expr, steps
    return None
