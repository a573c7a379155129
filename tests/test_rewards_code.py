"""Code rewards: HumanEval's canonical solutions pass, wrong ones and test-dodging hacks fail."""
import pytest

from r1kit.rewards import code_reward, combine, score_batch
from r1kit.tasks import load_benchmark, make_task
from r1kit.tasks.code_tests import run_tests_batch

ADD_TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n    assert candidate(5, 5) == 10\n"


def _fenced(code):
    return f"<think>I write it.</think>\n```python\n{code}\n```"


def test_humaneval_canonical_pass_and_wrong_fail():
    rows = load_benchmark("humaneval")
    good = [(s["prompt"] + s["meta"]["canonical_solution"], s["answer"], s["meta"]["entry_point"]) for s in rows]
    # a wrong solution for every 4th problem (all 164 run in bench/rewards.py's peer timing)
    wrong = [(s["prompt"] + "    return None\n", s["answer"], s["meta"]["entry_point"]) for s in rows[::4]]
    reports = run_tests_batch(good + wrong)
    failed = [rows[i]["meta"]["task_id"] for i, r in enumerate(reports[:len(good)]) if not r.all_passed]
    assert failed == []
    assert not any(r.all_passed for r in reports[len(good):])


def test_code_reward_forms():
    code = "def add(a, b):\n    return a + b"
    assert code_reward(_fenced(code), ADD_TESTS, "add") == 1.0
    assert code_reward(code, "assert add(2, 2) == 4") == 1.0
    assert code_reward(_fenced("def add(a, b):\n    return a - b"), ADD_TESTS, "add") == 0.0
    partial = "def add(a, b):\n    return a + b if a > 0 else 99"
    assert code_reward(_fenced(partial), ADD_TESTS, "add") == 0.0
    assert code_reward(_fenced(partial), ADD_TESTS, "add", fraction=True) == pytest.approx(2 / 3)
    he = load_benchmark("humaneval", limit=1)[0]  # a body-only continuation of the HumanEval prompt
    assert code_reward(he["meta"]["canonical_solution"], he["answer"], he["meta"]["entry_point"], prefix=he["prompt"]) == 1.0


@pytest.mark.parametrize("hack", [
    "import sys\nsys.exit(0)",                                                         # exits 0 before the tests
    "import os\nos._exit(0)",
    "def add(a, b):\n    return -7\nimport atexit, os\natexit.register(lambda: os._exit(0))",  # exit 0 after failing
    "class Yes:\n    def __eq__(self, o): return True\ndef add(a, b):\n    return Yes()",   # always-equal object
    "def add(a, b):\n    return -7\ndef check(candidate):\n    pass",                    # its own check
    "import builtins\nbuiltins.AssertionError = type('X', (BaseException,), {})\ndef add(a, b):\n    return -7",
    "import builtins\n_real = builtins.bool\nbuiltins.bool = lambda x: True\ndef add(a, b):\n    return -7",  # patches truth
    "def add(a, b):\n    return -7\nprint('All tests passed')\nprint('3 3 1')",           # fakes the report
    "def add(a, b):\n    raise SystemExit(0)",
    "def add(a, b):\n    import os\n    os.kill(os.getpid(), 9)",
    "def add(a, b):\n    while True: pass",
    "",
])
def test_code_hacks_score_zero(hack):
    assert code_reward(_fenced(hack), ADD_TESTS, "add", timeout_s=2) == 0.0
    assert code_reward(_fenced(hack), ADD_TESTS, "add", fraction=True, timeout_s=2) == 0.0


def test_truncated_code_completion_scores_zero():
    assert code_reward("<think>let me write ```python\ndef add(a, b):\n    return a + b\n```", ADD_TESTS, "add") == 0.0


def test_code_task_and_batch_scoring_in_the_pool():
    task = make_task("code", difficulty=3)
    samples = task.generate(6, seed=0)
    completions = [_fenced(s["meta"]["solution"]) for s in samples[:3]] + ["<think>x</think> no code"] * 3
    fn = combine({"accuracy": 1.0, "format": 1.0})
    out = score_batch(fn, completions, samples)
    assert [r.parts["accuracy"] for r in out] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert task.verify(f"```python\n{samples[0]['meta']['solution']}```", samples[0])
    assert not task.verify("```python\ndef nope(): pass\n```", samples[0])
