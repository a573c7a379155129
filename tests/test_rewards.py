"""Rewards: right answers score 1, reward hacks score 0, broken text never raises."""
import math
import random

import pytest

from r1kit.rewards import (RewardResult, combine, count_errors, format_reward, get_reward, language_reward,
                           make_length_reward, math_reward, score_batch, soft_overlong)
from r1kit.tasks import load_benchmark, make_task


def test_public_api_returns_floats():
    assert math_reward("<think>2+2</think> The answer is \\boxed{4}.", "4") == 1.0
    assert math_reward("<think>x</think> \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("<think>x</think> <answer>\\frac{2}{4}</answer>", "\\frac12") == 1.0
    assert math_reward("2+2 is\n#### 4", "4") == 1.0
    assert math_reward("<think>x</think> \\boxed{p - q}", "p-q") == 1.0
    assert math_reward("<think>x</think> \\boxed{5}", "4") == 0.0
    assert format_reward("<think>reasoning</think> answer") == 1.0
    assert format_reward("<think>r</think> <answer>42</answer>") == 1.0
    assert format_reward("reasoning opened by the prompt</think> answer") == 1.0  # like split_reasoning
    assert isinstance(math_reward("x", "1"), float) and isinstance(format_reward("x"), float)


@pytest.mark.parametrize("completion", [
    "<think>the answer is 42</think>",                               # empty answer
    "<think>so \\boxed{42}</think> I am not sure",                   # answer only inside the thinking
    "<think>x</think> \\boxed{42} or \\boxed{41}",                   # several different boxed answers
    "<think>x</think> <answer>42</answer></answer>",                 # repeated </answer>
    "<think>x</think> <answer>41</answer> <answer>42</answer>",      # two answers
    "<think>x</think> 41 </think> 42",                               # repeated </think>
    "<think>x</think></think> 42",
    "<think>working... 42",                                          # truncated, no closing tag
    "<think>x</think>   ",
])
def test_math_hacks_score_zero(completion):
    assert math_reward(completion, "42") == 0.0


def test_format_hacks_score_zero():
    for bad in ["<think>x</think>", "<think>x", "<think></think> a", "no tags at all", "<think>a</think> b </think> c",
                "<think>a</think> <answer>b</answer></answer>", "<think>a</think><think>b</think> c",
                "<think>a</think> <answer></answer>"]:
        assert format_reward(bad) == 0.0, bad
    assert format_reward("<think>a</think> <answer>b</answer>", style="r1_zero") == 1.0
    assert format_reward("<think>a</think> b", style="r1_zero") == 0.0
    with pytest.raises(ValueError, match="style"):
        format_reward("x", style="nope")


def test_countdown_reward_and_hacks():
    reward = get_reward("countdown")
    s = {"prompt": "p", "answer": 56, "task": "countdown", "meta": {"numbers": [3, 5, 7], "target": 56}}
    assert reward("<think>3+5=8; 8*7=56</think> <answer>(3+5)*7</answer>", s) == 1.0
    assert reward("<think>x</think> (5+3)*7 = 56", s) == 1.0
    for hack in ["<think>x</think> <answer>56</answer>",                 # the target without an expression
                 "<think>x</think> <answer>(7+7)*(5-3)*2</answer>",      # reuses numbers
                 "<think>x</think> <answer>3*5+7 = 56</answer>",         # false claim
                 "<think>x</think> <answer>__import__('os').system('x')</answer>",
                 "<think>(3+5)*7</think>", "<think>x</think> <answer>(3+5)*7</answer></answer>"]:
        assert reward(hack, s) == 0.0, hack


def test_multiple_choice():
    reward = get_reward("multiple_choice")
    s = {"prompt": "p", "answer": "D", "task": "multiple_choice", "meta": {}}
    assert reward("<think>x</think> \\boxed{D}", s) == 1.0
    assert reward("<think>x</think> The answer is (D).", s) == 1.0
    for hack in ["<think>x</think> \\boxed{A} \\boxed{D}", "<think>D</think> no idea", "<think>x</think> A B C D"]:
        assert reward(hack, s) == 0.0


def test_language_and_length():
    assert language_reward("<think>we add the numbers</think> 5") == 1.0
    assert language_reward("<think>我们把数字加起来</think> 5", {"meta": {"language": "zh"}}) == 1.0
    mixed = language_reward("<think>we add 数字加起来</think> 5")
    assert 0.3 < mixed < 0.7
    assert soft_overlong(10, 100, 20) == 1.0 and soft_overlong(90, 100, 20) == 0.5 and soft_overlong(150, 100, 20) == 0.0
    assert make_length_reward(100, 20)("x" * 90, {}) == 0.5


def test_combine_normalises_and_names_parts():
    task = make_task("arithmetic", difficulty=2)
    s = task.generate(1, seed=0)[0]
    fn = combine({"accuracy": 2.0, "format": 1.0})
    good = fn(f"<think>steps</think> <answer>{s['answer']}</answer>", s)
    assert isinstance(good, RewardResult) and good.score == 1.0 and good.parts == {"accuracy": 1.0, "format": 1.0}
    half = fn("<think>steps</think> <answer>-1</answer>", s)
    assert math.isclose(half.score, 1 / 3)
    with pytest.raises(ValueError, match="unknown reward 'nope'.*accuracy"):
        combine({"nope": 1.0})
    with pytest.raises(ValueError, match="sum to 0"):
        combine({"accuracy": 0.0})
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_reward("accuracy")("x", {"prompt": "p", "answer": 1, "task": "chess", "meta": {}})
    with pytest.raises(ValueError, match="missing field 'answer'"):
        get_reward("accuracy")("x", {"prompt": "p", "task": "math", "meta": {}})


def test_rewards_never_raise_on_model_text():
    rng = random.Random(0)
    alphabet = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "}", "{", "$", "\\frac", "1", "2", "+", "(",
                ")", "=", "####", " ", "\n", "\x00", "é", "数", "```", "def f(x):", "\\"]
    samples = [make_task(n).generate(1, seed=1)[0] for n in ("countdown", "arithmetic", "word_problems")]
    samples.append({"prompt": "p", "answer": "\\frac{\\pi}{2}", "task": "math", "meta": {}})
    samples.append({"prompt": "p", "answer": "B", "task": "multiple_choice", "meta": {}})
    fn = combine({"accuracy": 1, "format": 1, "language": 0.5, "length": 0.5})
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for s in samples:
            r = fn(text, s)
            assert 0.0 <= r.score <= 1.0
    for weird in [None, 123, b"bytes", "x" * 100_000]:
        assert math_reward(weird, "1") == 0.0 and format_reward(weird) == 0.0


def test_score_batch_flags_errors_and_nan():
    def flaky(c, s):
        if c == "raise":
            raise RuntimeError("boom")
        return float("nan") if c == "nan" else 1.0

    out = score_batch(flaky, ["ok", "raise", "nan"], [{}, {}, {}])
    assert [r.score for r in out] == [1.0, 0.0, 0.0] and count_errors(out) == 2 and "boom" in out[1].error
    with pytest.raises(ValueError, match="2 completions but 1 samples"):
        score_batch(flaky, ["a", "b"], [{}])


def test_gsm8k_reference_solutions():
    samples = load_benchmark("gsm8k")
    for i, s in enumerate(samples):
        solution = s["meta"]["solution"]
        assert math_reward(solution, s["answer"]) == 1.0, i
        other = next(o["answer"] for o in samples[i + 1:] + samples[:i] if o["answer"] != s["answer"])
        assert math_reward(solution, other) == 0.0, i


def test_math500_reference_answers_match_themselves():
    for s in load_benchmark("math500", limit=60):
        assert math_reward(f"<think>x</think> \\boxed{{{s['answer']}}}", s["answer"]) == 1.0, s["answer"]
