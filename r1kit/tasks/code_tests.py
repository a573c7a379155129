"""Run a program's unit tests in the sandbox and say how many passed, in a way code cannot fake.

The harness (main.py in the sandbox) reads a random nonce from stdin before the candidate's code
runs, runs the code as module `solution`, undoes any patching of builtins it did at import, then
runs the tests with every `assert` rewritten to a counted check and every `==` in them to a strict
equality (plain values only: an object whose __eq__ always says True does not pass). It prints
"<nonce> <passed> <total>" only when the tests ran to the end. So code that exits early (sys.exit,
os._exit, an atexit hook), defines its own `check`, or prints "all tests passed" earns nothing.
This is a hack filter, not a proof: code running in the same interpreter can always, with enough
effort, find the nonce in memory.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from r1kit import sandbox

_HARNESS = r'''
import ast, builtins, json, os, sys

def _harness():
    nonce = sys.stdin.readline().strip()
    cfg = json.loads(open("config.json").read())
    solution, tests = open("solution.py").read(), open("tests.py").read()
    for name in ("config.json", "solution.py", "tests.py"):
        os.remove(name)
    report = os.fdopen(os.dup(1), "w")
    plain = (bool, int, float, complex, str, bytes, type(None), list, tuple, dict, set, frozenset, range)
    _type, _isinstance, _len, _zip, _all = type, isinstance, len, zip, all

    def is_plain(x, depth=0):
        if _type(x) not in plain or depth > 50:
            return False
        if _type(x) in (list, tuple, set, frozenset):
            return _all(is_plain(v, depth + 1) for v in x)
        if _type(x) is dict:
            return _all(is_plain(k, depth + 1) and is_plain(v, depth + 1) for k, v in x.items())
        return True

    def strict_eq(a, b):
        return is_plain(a) and is_plain(b) and a == b

    counts = [0, 0]  # passed, executed

    def check_assert(test, line):
        counts[1] += 1
        try:
            ok = bool(test())
        except Exception:
            ok = False
        if ok:
            counts[0] += 1
        elif not cfg["fraction"]:
            raise AssertionError(f"test at line {line} failed")

    class Rewrite(ast.NodeTransformer):
        def visit_Assert(self, node):
            self.generic_visit(node)
            call = ast.Call(ast.Name("__r1kit_assert__", ast.Load()),
                            [ast.Lambda(ast.arguments([], [], None, [], [], None, []), node.test),
                             ast.Constant(node.lineno)], [])
            return ast.copy_location(ast.Expr(call), node)

        def visit_Compare(self, node):
            self.generic_visit(node)
            if _len(node.ops) == 1 and _type(node.ops[0]) in (ast.Eq, ast.NotEq):
                call = ast.Call(ast.Name("__r1kit_eq__", ast.Load()), [node.left, node.comparators[0]], [])
                if _type(node.ops[0]) is ast.NotEq:
                    call = ast.UnaryOp(ast.Not(), call)
                return ast.copy_location(call, node)
            return node

    tree = ast.parse(tests)
    static_total = sum(_isinstance(n, ast.Assert) for n in ast.walk(tree))
    tree = ast.fix_missing_locations(Rewrite().visit(tree))
    saved_builtins = dict(builtins.__dict__)
    ns = {"__name__": "solution"}
    error = ""
    try:
        exec(compile(solution, "solution.py", "exec"), ns)
    except BaseException as e:  # SystemExit included: the tests still decide
        error = f"solution: {_type(e).__name__}"
    builtins.__dict__.clear()
    builtins.__dict__.update(saved_builtins)
    ns["__r1kit_assert__"], ns["__r1kit_eq__"] = check_assert, strict_eq
    finished = True
    try:
        exec(compile(tree, "tests.py", "exec", optimize=0), ns)
        if cfg["entry_point"]:
            ns["check"](ns[cfg["entry_point"]])
    except BaseException as e:
        finished, error = False, error or f"tests: {_type(e).__name__}: {e}"[:300]
    total = max(counts[1], static_total)
    report.write(f"{nonce} {counts[0]} {total} {int(finished)} {error}\n")
    report.flush()
    os._exit(0)

_harness()
'''


@dataclass
class TestReport:
    passed: int
    total: int
    finished: bool  # the tests ran to the end (all-or-nothing: no assert failed)
    status: str  # the sandbox status; "ok" only when the harness reported
    detail: str = ""

    @property
    def all_passed(self) -> bool:
        return self.status == "ok" and self.finished and self.total > 0 and self.passed == self.total

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.status == "ok" and self.total else 0.0


def build_job(code: str, tests: str, entry_point: str | None, fraction: bool) -> tuple[dict, str, str]:
    """(run kwargs, nonce) for sandbox.run."""
    nonce = secrets.token_hex(16)
    files = {"solution.py": code, "tests.py": tests,
             "config.json": json.dumps({"entry_point": entry_point, "fraction": fraction})}
    return {"files": files, "stdin": nonce + "\n"}, nonce, _HARNESS


def read_report(result: sandbox.SandboxResult, nonce: str) -> TestReport:
    for line in reversed(result.stdout.splitlines()):
        parts = line.split(" ", 4)
        if len(parts) >= 4 and parts[0] == nonce:
            try:
                passed, total, finished = int(parts[1]), int(parts[2]), parts[3] == "1"
            except ValueError:
                break
            status = "ok" if result.status == "ok" else result.status
            return TestReport(passed, total, finished, status, parts[4] if len(parts) > 4 else "")
    status = result.status if result.status != "ok" else "no_report"
    return TestReport(0, 0, False, status, (result.detail + " " + result.stderr[-300:]).strip())


def run_tests(code: str, tests: str, entry_point: str | None = None, *, fraction: bool = False,
              timeout_s: float = 10.0, memory_mb: int = 1024) -> TestReport:
    """Run `code` then `tests` (asserts, or a `check(candidate)` called with `entry_point`)."""
    kwargs, nonce, harness = build_job(code, tests, entry_point, fraction)
    return read_report(sandbox.run(harness, timeout_s=timeout_s, memory_mb=memory_mb, **kwargs), nonce)


def run_tests_batch(jobs: list[tuple[str, str, str | None]], *, fraction: bool = False, timeout_s: float = 10.0,
                    memory_mb: int = 1024) -> list[TestReport]:
    """Many (code, tests, entry_point) on the sandbox worker pool."""
    prepared = [build_job(c, t, e, fraction) for c, t, e in jobs]
    futures = [sandbox.submit(h, timeout_s=timeout_s, memory_mb=memory_mb, **kw) for kw, _, h in prepared]
    return [read_report(f.result(), nonce) for f, (_, nonce, _) in zip(futures, prepared)]


def extract_code(text: str) -> str | None:
    """The program in a completion's answer: the last ```python block, else the last ``` block,
    else the answer text itself when it looks like code. None when there is no answer."""
    import re

    from r1kit.tasks.base import answer_part

    body = answer_part(text) if "</think>" in text or "<answer>" in text or "<think>" in text else text
    blocks = re.findall(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", body, re.S)
    if blocks:
        return blocks[-1]
    if not body.strip():
        return None
    body = body.lstrip("\n").rstrip()  # keep the first line's indentation (a function body)
    return body if re.search(r"^\s*(def|class|import|from)\s", body, re.M) else None
