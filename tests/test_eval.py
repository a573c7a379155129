"""Evaluation statistics against hand computations, the runner on a fixture model, resume."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from r1kit import eval as ev


# ------------------------------------------------------------------------------ statistics


def test_pass_at_k_matches_the_combinatorial_definition():
    # by hand: n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6; pass@4 = 1
    assert ev.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert ev.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert ev.pass_at_k(4, 1, 4) == pytest.approx(1.0)
    assert ev.pass_at_k(4, 0, 4) == 0.0
    assert ev.pass_at_k(4, 3, 2) == 1.0  # only one wrong sample: any 2 include a correct one
    for n in (5, 16, 64):
        for c in range(n + 1):
            for k in (1, 2, n // 2, n):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert ev.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError, match="k <= n"):
        ev.pass_at_k(4, 1, 8)


# 3 problems x 4 samples; extracted answers and verdicts (reference answers: 7, 12, 5)
ANSWERS = [
    ["7", "7", "8", "8"],      # tie 2-2: the answer seen first (7) wins -> correct
    ["12", "12.0", " 12", "12"],  # all the same after normalisation -> correct
    ["3", "3", None, "5"],     # 3 wins the vote -> wrong, though one sample is right
]
CORRECT = [[True, True, False, False], [True, True, True, True], [False, False, False, True]]


def test_pass_at_1_interval_and_cons_at_k_by_hand():
    mean, low, high = ev.pass_at_1(CORRECT)
    # per-problem means 2/4, 4/4, 1/4 -> mean 7/12; deviations -1/12, 5/12, -4/12 ->
    # sample variance (1 + 25 + 16) / 144 / 2 = 21/144 -> std sqrt(21)/12; se = std / sqrt(3)
    se = math.sqrt(21) / 12 / math.sqrt(3)
    assert mean == pytest.approx(7 / 12)
    assert low == pytest.approx(7 / 12 - 1.959963984540054 * se)
    assert high == 1.0  # 7/12 + 0.432 > 1: clipped to the possible range
    assert ev.majority_vote(ANSWERS[0]) == 0
    assert ev.majority_vote(ANSWERS[2]) == 0
    assert ev.majority_vote([None, None]) is None
    assert ev.cons_at_k(ANSWERS, CORRECT) == pytest.approx(2 / 3)

    s = ev.summarize(CORRECT, ANSWERS)
    assert s["num_problems"] == 3 and s["k"] == 4 and s["num_samples"] == 12
    assert s["pass1"] == pytest.approx(100 * 7 / 12)
    assert s["cons_at_k"] == pytest.approx(200 / 3)
    # pass@2 per problem: 1 - C(2,2)/C(4,2) = 5/6, 1, 1 - C(3,2)/C(4,2) = 1/2
    assert s["pass_at_k"]["2"] == pytest.approx(100 * (5 / 6 + 1 + 1 / 2) / 3)
    assert s["pass_at_k"]["4"] == pytest.approx(100.0)
    assert s["pass_at_k"]["1"] == pytest.approx(s["pass1"])


def test_interval_of_a_single_problem_collapses_and_unclipped_interval():
    assert ev.pass_at_1([[True, False]]) == (0.5, 0.5, 0.5)
    mean, low, high = ev.pass_at_1([[True, False], [False, False], [True, True], [True, False]])
    # per-problem 0.5, 0, 1, 0.5: mean 0.5, std sqrt(0.5/3), se std/2
    half = 1.959963984540054 * math.sqrt(0.5 / 3) / 2
    assert (mean, low, high) == pytest.approx((0.5, 0.5 - half, 0.5 + half))


def test_answer_extraction_and_normalisation():
    assert ev.extract_answer("a+b...\n</think>\n\n<answer>1,000</answer>") == "1,000"
    assert ev.normalize_answer("1,000") == ev.normalize_answer("1000.0") == "1000"
    assert ev.extract_answer("so\n</think>\nThe answer is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert ev.extract_answer("still thinking, cut off") is None  # truncated inside the thinking
    assert ev.normalize_answer("\\text{(B)} ") == "(B)"


# ------------------------------------------------------------------------------ the runner


@dataclass
class FakeGeneration:
    prompt_index: int
    token_ids: list
    logprobs: list
    text: str
    finish_reason: str = "stop"


class FixtureModel:
    """Engine.generate's interface, answering from a table: prompt text -> k completions."""

    def __init__(self, tokenizer, table, fail_after_calls=None):
        self.tokenizer, self.table, self.fail_after_calls = tokenizer, table, fail_after_calls
        self.prompts_seen = []

    def generate(self, prompts, params):
        if self.fail_after_calls is not None and len(self.prompts_seen) >= self.fail_after_calls:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-run
        self.prompts_seen.append(len(prompts))
        out = []
        for i, ids in enumerate(prompts):
            texts = self.table(self.tokenizer.decode(ids), params.n)
            out += [FakeGeneration(i, self.tokenizer.encode(t), [0.0] * len(t), t) for t in texts]
        return out


@pytest.fixture(scope="module")
def tokenizer():
    from r1kit.tokenizer import train_tokenizer

    return train_tokenizer([], kind="char")


def _math500(limit):
    return ev.load_samples("math500", limit=limit)


def _known_answers(samples):
    """The reference answer boxed for even problems, a wrong number for odd ones."""
    by_prompt = {s["prompt"]: (i, s) for i, s in enumerate(samples)}

    def table(prompt_text, n):
        (i, s), = [v for p, v in by_prompt.items() if p in prompt_text]
        answer = s["answer"] if i % 2 == 0 else "123456789"
        return [f"Let me work it out.\n</think>\n\nSo the answer is $\\boxed{{{answer}}}$." for _ in range(n)]

    return table


def test_math500_with_a_fixture_model_scores_exactly_half(tokenizer, tmp_path):
    samples = _math500(10)
    assert len(samples) == 10
    model = FixtureModel(tokenizer, _known_answers(samples))
    out = tmp_path / "math500.jsonl"
    s = ev.evaluate(None, tokenizer, samples, k=2, out=out, engine=model, benchmark="math500", progress=False)
    assert s["pass1"] == pytest.approx(50.0)
    assert s["cons_at_k"] == pytest.approx(50.0)
    assert s["pass_at_k"]["2"] == pytest.approx(50.0)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 20
    assert all(r["correct"] == (r["problem"] % 2 == 0) for r in lines)
    assert {r["benchmark"] for r in lines} == {"math500"}
    # the R1 prompt: one user turn, generation prompt opening the thinking
    rendered = ev.build_prompt(tokenizer, samples[0])
    assert rendered.endswith("<｜Assistant｜><think>\n") and samples[0]["prompt"] in rendered


def test_interrupted_evaluation_resumes_where_it_stopped(tokenizer, tmp_path):
    samples = _math500(10)
    out = tmp_path / "run.jsonl"
    table = _known_answers(samples)
    first = FixtureModel(tokenizer, table, fail_after_calls=2)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(None, tokenizer, samples, k=4, out=out, engine=first, batch_size=8, progress=False)
    assert len(out.read_text().splitlines()) == 2 * 2 * 4  # two batches of two problems, k=4
    # a crash while writing leaves a torn line: it is dropped, not parsed
    with open(out, "a") as f:
        f.write('{"problem": 4, "sample": 0, "compl')
    second = FixtureModel(tokenizer, table)
    s = ev.evaluate(None, tokenizer, samples, k=4, out=out, engine=second, batch_size=8, progress=False)
    assert sum(second.prompts_seen) == 6  # only the 6 problems not yet in the file
    assert s["pass1"] == pytest.approx(50.0) and s["num_problems"] == 10
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["problem"], r["sample"]) for r in lines) == [(p, j) for p in range(10) for j in range(4)]
    # a finished file is not evaluated again; other settings are refused, naming the file
    third = FixtureModel(tokenizer, table)
    ev.evaluate(None, tokenizer, samples, k=4, out=out, engine=third, progress=False)
    assert third.prompts_seen == []
    with pytest.raises(ValueError, match="other settings.*temperature"):
        ev.evaluate(None, tokenizer, samples, k=4, out=out, engine=third, temperature=1.0, progress=False)


def test_unknown_benchmark_lists_what_exists():
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        ev.load_samples("aime2099")
    assert "math500" in str(err.value) and "benchmarks" in str(err.value)


def test_missing_data_file_says_where_it_looked(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "aime24.jsonl").write_text('{"prompt": "1+1?", "answer": 2}\n')
    monkeypatch.setenv("R1KIT_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        ev.load_samples("math500")
    assert str(tmp_path / "benchmarks") in str(err.value) and "aime24.jsonl" in str(err.value)
    assert ev.load_samples("aime24")[0]["answer"] == "2"


def test_summary_table_renders(tokenizer):
    from rich.console import Console

    s = ev.summarize(CORRECT, ANSWERS)
    s["benchmark"] = "fixture"
    console = Console(record=True, width=120)
    console.print(ev.summary_table({"tiny": s}))
    text = console.export_text()
    assert "58.3" in text and "66.7" in text
