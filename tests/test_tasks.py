import gzip
import json
import random

import pytest

from r1kit.tasks import TASKS, load_benchmark, load_hf, load_jsonl, make_task, validate_sample
from r1kit.tasks.countdown import check, parse_expression


@pytest.mark.parametrize("name", ["countdown", "arithmetic", "word_problems", "code"])
def test_generators_are_seeded_valid_and_verifiable(name):
    task = make_task(name, difficulty=2)
    a, b = task.generate(6, seed=3), task.generate(6, seed=3)
    assert a == b and a != task.generate(6, seed=4) and task.name == name
    for s in a:
        validate_sample(s)
        assert s["task"] == name
    if name != "code":  # the code task's own verifier is exercised in test_rewards_code
        rng = random.Random(0)
        for s in a:
            reasoning, answer = task.worked_solution(s, rng)
            assert task.verify(answer, s), (s, answer)
            assert not task.verify("", s)


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match="countdown"):
        make_task("sudoku")
    assert {"countdown", "arithmetic", "word_problems", "code"} <= set(TASKS)


def test_arithmetic_worked_solution_and_sloppy_mode():
    task = make_task("arithmetic", difficulty=3)
    s = {"prompt": "What is 347+589?", "answer": "936", "task": "arithmetic", "meta": {"a": 347, "b": 589, "op": "+"}}
    reasoning, answer = task.worked_solution(s, random.Random(0))
    assert answer == "936" and reasoning.startswith("7+9=16 write 6 carry 1; 4+8+1=13 write 3 carry 1")
    _, wrong = task.worked_solution(s, random.Random(0), sloppy=True)
    assert wrong == "826"  # forgets every carry
    samples = task.generate(200, seed=0)
    assert all(len(task.worked_solution(x)[0]) <= 85 for x in samples)
    assert all(x["prompt"].startswith("What is ") and len(x["prompt"]) <= 17 for x in samples)
    wrong_share = sum(task.worked_solution(x, sloppy=True)[1] != x["answer"] for x in samples) / len(samples)
    assert wrong_share > 0.5  # systematic: wrong whenever a carry happens
    for ops in (("-",), ("*",)):
        t = make_task("arithmetic", difficulty=3, ops=ops)
        for x in t.generate(50, seed=1):
            assert t.worked_solution(x)[1] == x["answer"]
    with pytest.raises(ValueError, match="ops"):
        make_task("arithmetic", ops=("^",))


def test_countdown_sloppy_is_always_wrong_and_parser_is_safe():
    task = make_task("countdown", difficulty=1)
    for s in task.generate(100, seed=0):
        _, answer = task.worked_solution(s, sloppy=True)
        assert not task.verify(answer, s)
    assert parse_expression("(3+5)*7")[0] == 56
    for bad in ["__import__('os')", "2**100", "-3+5", "3.5+1", "a+1", "[1]", "1" * 300, "((((", ""]:
        assert parse_expression(bad) is None, bad
    assert check("(3+5)*7 = 56", [3, 5, 7], 56) == (True, True)
    assert check("3*5+7", [3, 5, 7], 56) == (True, False)


def test_benchmarks_load_as_samples():
    expected = {"aime24": 30, "aime25": 30, "math500": 500, "gsm8k": 1319, "gpqa": 198, "humaneval": 164}
    for name, n in expected.items():
        samples = load_benchmark(name)
        assert len(samples) == n
        for s in samples[:5]:
            validate_sample(s)
    assert load_benchmark("gsm8k", limit=1)[0]["answer"] == "18"
    assert load_benchmark("gpqa", limit=1)[0]["answer"] == "D"
    h = load_benchmark("humaneval", limit=1)[0]
    assert h["task"] == "code" and h["meta"]["entry_point"] == "has_close_elements" and h["answer"] == h["meta"]["test"]
    assert len(load_benchmark("gsm8k_train", limit=10)) == 10


def test_benchmark_errors_name_file_line_and_field(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'nope'.*aime24"):
        load_benchmark("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "x #### 3"}\n{"question": "q2"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_benchmark(bad)
    bad.write_text('{"question": "q", "answer": "x #### 3"}\n{"question": "q", "answer": "no final"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer' has no '#### N'"):
        load_benchmark(bad)
    mapped = tmp_path / "mine.jsonl"
    mapped.write_text(json.dumps({"q": "1+1?", "a": 2, "src": "x"}) + "\n" + json.dumps({"q": 5, "a": 1}) + "\n")
    with pytest.raises(ValueError, match=r"mine.jsonl:2: field 'q' must be str"):
        load_jsonl(mapped, prompt_field="q", answer_field="a")
    s = load_jsonl(mapped, prompt_field="q", answer_field="a", meta_fields=("src",), limit=1)[0]
    assert s == {"prompt": "1+1?", "answer": 2, "task": "math", "meta": {"source": str(mapped), "src": "x"}}
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")
    gz = tmp_path / "he.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"task_id": "x", "prompt": "def f():\n", "entry_point": "f"}) + "\n")
    with pytest.raises(ValueError, match="cannot tell the benchmark format"):
        load_benchmark(gz)


def test_malformed_samples_are_named():
    with pytest.raises(ValueError, match="missing field 'answer'"):
        validate_sample({"prompt": "p", "task": "math", "meta": {}})
    with pytest.raises(ValueError, match="'prompt' must be str"):
        validate_sample({"prompt": 3, "answer": 1, "task": "math"})
    with pytest.raises(ValueError, match="must be a dict"):
        validate_sample(["p"])


def test_hf_loader_is_optional():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="datasets"):
            load_hf("openai/gsm8k")
    else:
        with pytest.raises(Exception):
            load_hf("r1kit/definitely-not-a-dataset")  # offline: a clear failure, not a hang
