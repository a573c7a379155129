"""The generation engine: exactness against full forwards, batching, sampling, stopping, streaming,
and the continuous-batching scheduler."""
from __future__ import annotations

import time

import pytest
import torch

from r1kit.engine import Engine, QueueFull, SamplingParams, Scheduler, generate_text, sample
from r1kit.model import ModelConfig, Transformer
from r1kit.tokenizer import train_tokenizer

PROMPTS = [[5, 17, 42, 9, 100], [3], list(range(30, 52)), [250, 251, 7, 7, 7, 7, 1, 2]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: one intra-op thread avoids OpenMP stalls when other processes share the cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["hello world"], kind="char")


def make_model(preset: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset(preset, **overrides)).eval()


@pytest.fixture(scope="module", params=["tiny", "tiny-dense"])
def model(request):
    return make_model(request.param)


def full_logits(model, prompt, completion):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion]))[0].float()
    return logits[len(prompt) - 1: len(prompt) - 1 + len(completion)]


# ---------------------------------------------------------------------------- exactness


def test_greedy_is_argmax_of_full_forward_at_every_step(model):
    engine = Engine(model, max_batch_size=8)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert len(outs) == len(PROMPTS)
    for out, prompt in zip(outs, PROMPTS):
        logits = full_logits(model, prompt, out.token_ids)
        assert logits.argmax(-1).tolist() == out.token_ids
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)
        assert out.finish_reason == "length" and len(out.token_ids) == 24


def test_compiled_decode_equals_eager(model):
    """compile=...: static shapes (the whole cache under the mask), the same tokens and log-probs.
    The aot_eager backend traces exactly what inductor would compile, without a C++ build."""
    torch._dynamo.reset()
    eager = Engine(model, max_batch_size=8, max_seq_len=48)
    compiled = Engine(model, max_batch_size=8, max_seq_len=48, compile="aot_eager")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    a, b = eager.generate(PROMPTS, params), compiled.generate(PROMPTS, params)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4


def test_frozen_compiled_decode_equals_eager_and_refuses_changed_weights():
    """freeze=True (inductor, weights compiled in as constants): the same greedy tokens; after an
    in-place weight update the engine refuses to generate with its stale copy."""
    torch._dynamo.reset()
    model = make_model("tiny-dense", seed=4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    frozen = Engine(model, max_batch_size=2, max_seq_len=32, compile=True, freeze=True)
    assert frozen.freeze
    ref = Engine(model, max_batch_size=2, max_seq_len=32).generate([[1, 2, 3]], params)
    assert frozen.generate([[1, 2, 3]], params)[0].token_ids == ref[0].token_ids
    # a frozen engine skips Dynamo's guards on the model: another model of the same shapes gets its own
    # graph with its own weights, never the first engine's
    other = make_model("tiny-dense", seed=5)
    ref_other = Engine(other, max_batch_size=2, max_seq_len=32).generate([[1, 2, 3]], params)[0]
    got_other = Engine(other, max_batch_size=2, max_seq_len=32, compile=True, freeze=True).generate([[1, 2, 3]], params)[0]
    assert got_other.token_ids == ref_other.token_ids
    assert max(abs(p - q) for p, q in zip(got_other.logprobs, ref_other.logprobs)) < 1e-4
    assert max(abs(p - q) for p, q in zip(ref_other.logprobs, ref[0].logprobs)) > 1e-2  # the weights do differ
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)  # what an optimizer step does
    with pytest.raises(RuntimeError, match="weights changed"):
        frozen.generate([[1, 2, 3]], params)
    Engine(model, max_batch_size=2, max_seq_len=32, compile="aot_eager").generate([[1, 2, 3]], params)  # not frozen: fine


def test_batched_equals_one_at_a_time(model):
    engine = Engine(model, max_batch_size=64)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    batched = engine.generate(PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        single = engine.generate([prompt], params)[0]
        assert single.token_ids == batched[i].token_ids
        assert torch.allclose(torch.tensor(single.logprobs), torch.tensor(batched[i].logprobs), atol=1e-5)
    # small max_batch_size: the prompts run in several chunks, same answers
    chunked = Engine(model, max_batch_size=1).generate(PROMPTS, params)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in batched]


def test_sampled_logprobs_are_tempered_log_softmax_of_full_forward(model):
    engine = Engine(model)
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=40, max_tokens=12, seed=11, ignore_eos=True)
    outs = engine.generate(PROMPTS[:2], params)
    assert [o.prompt_index for o in outs] == [0, 0, 0, 1, 1, 1]  # prompt-major
    for out in outs:
        logits = full_logits(model, PROMPTS[out.prompt_index], out.token_ids)
        expected = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


@pytest.mark.parametrize("compile,static", [(False, False), ("aot_eager", False), ("aot_eager", True)])
def test_early_stops_and_compaction_keep_rows_exact(compile, static):
    """Compiled, the batch shrinks to powers of two (dead rows ride along as padding). `static`: the
    caches CUDA graphs need, one per batch size reused across calls with stale slots left in them."""
    model = make_model("tiny-dense", seed=3)
    engine = Engine(model, max_seq_len=64, compile=compile)
    if static:
        engine._graph_caches = {}  # what compile=True on a GPU sets
    prompts = [[i, i + 1, (7 * i) % 500] for i in range(1, 9)]
    free = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    stop_ids = {free[i].token_ids[1 + i] for i in range(5)}  # rows end at different steps
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=stop_ids))
    for out, ref in zip(outs, free):
        cut = next((j for j, t in enumerate(ref.token_ids) if t in stop_ids), None)
        if cut is None:
            assert out.token_ids == ref.token_ids and out.finish_reason == "length"
        else:  # the stop token is kept in token_ids (with its logprob), the row ends there
            assert out.token_ids == ref.token_ids[: cut + 1] and out.finish_reason == "stop"
            assert len(out.logprobs) == cut + 1
    if static:  # every batch size met got one cache, and reusing them (stale) changes nothing
        assert sorted(engine._graph_caches) == [4, 8]  # 8 rows, then 4 once half of them stopped
        again = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        assert [o.token_ids for o in again] == [o.token_ids for o in free]


# ---------------------------------------------------------------------------- sampling


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 5
    rest_obs, rest_exp = counts[~keep].sum(), expected[~keep].sum()
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    if rest_exp > 5:
        stat = stat + (rest_obs - rest_exp) ** 2 / rest_exp
    return float(stat)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.7), dict(temperature=0.8, min_p=0.1),
])
def test_sampler_draws_with_the_logits_probabilities(kwargs):
    torch.manual_seed(0)
    V, N = 24, 60_000
    logits = torch.randn(V) * 2
    g = torch.Generator().manual_seed(1)
    tokens, logprobs = sample(logits.expand(N, V).clone(), generator=g, **{k: v for k, v in kwargs.items()})
    counts = torch.bincount(tokens, minlength=V).float()
    # what the filters should leave, following transformers' warpers
    scaled = logits / kwargs["temperature"]
    probs = scaled.softmax(-1)
    allowed = torch.ones(V, dtype=torch.bool)
    order = probs.argsort(descending=True)
    if kwargs.get("top_k"):
        allowed[order[kwargs["top_k"]:]] = False
    if kwargs.get("top_p"):
        before = probs[order].cumsum(0) - probs[order]
        allowed[order[(before >= kwargs["top_p"]) & (torch.arange(V) > 0)]] = False
    if kwargs.get("min_p"):
        allowed &= probs >= kwargs["min_p"] * probs.max()
    target = torch.where(allowed, probs, torch.zeros_like(probs))
    target = target / target.sum()
    assert counts[~allowed].sum() == 0
    dof = int(allowed.sum()) - 1
    assert chi_square(counts, target) < dof + 6 * (2 * dof) ** 0.5 + 10
    # logprobs are of the unfiltered tempered distribution
    assert torch.allclose(logprobs, torch.log_softmax(scaled, -1)[tokens], atol=1e-5)


def test_engine_first_tokens_follow_model_probabilities():
    model = make_model("tiny", seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a peaked distribution: few tokens carry the mass
    prompt = [1, 2, 3, 4]
    with torch.no_grad():
        probs = model(torch.tensor([prompt]))[0, -1].float().softmax(-1)
    engine = Engine(model, max_batch_size=4096)
    outs = engine.generate([prompt], SamplingParams(n=4000, max_tokens=1, temperature=1.0, seed=2, ignore_eos=True))
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=probs.numel()).float()
    assert chi_square(counts, probs) < 60
    assert (counts > 0).sum() >= 3  # really sampling, not greedy


def test_seeded_sampling_is_reproducible(model):
    engine = Engine(model)
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=10, seed=123, ignore_eos=True)
    a, b = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=10, seed=124,
                                                ignore_eos=True))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    assert len({tuple(o.token_ids) for o in a[:4]}) > 1  # the n samples of a prompt differ


# ---------------------------------------------------------------------------- stopping and text


def test_eos_stop_strings_and_text(tokenizer):
    model = make_model("tiny", seed=1, vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello world ")
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    assert free.text == tokenizer.decode(free.token_ids, skip_special_tokens=True)
    # eos (the tokenizer's) stops unless ignore_eos
    model.config.eos_token_id = None
    eos_engine = Engine(model, tokenizer)
    eos_engine.eos_token_ids = {free.token_ids[3]}
    out = eos_engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30))[0]
    cut = free.token_ids.index(free.token_ids[3])
    assert out.token_ids == free.token_ids[: cut + 1] and out.finish_reason == "stop"
    # a stop string: text ends before it, tokens end with the token that completed it
    text = free.text
    stop = next(text[j:j + 2] for j in range(4, len(text) - 1) if text[j:j + 2].isprintable() and "\ufffd" not in text[j:j + 2])
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    assert out.token_ids == free.token_ids[: len(out.token_ids)] and len(out.token_ids) < 30
    assert stop in tokenizer.decode(out.token_ids)
    # generate_text: strings in, text out
    via_text = generate_text(engine, ["hello world "], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert via_text[0].text == free.text


def test_stream_matches_generate(tokenizer):
    model = make_model("tiny-dense", seed=2, vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello")
    params = SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=9, stop=["e"], ignore_eos=True)
    whole = engine.generate([prompt], params)
    deltas = list(engine.stream(prompt, params))
    for i in range(2):
        mine = [d for d in deltas if d.index == i]
        assert sum((d.token_ids for d in mine), []) == whole[i].token_ids
        assert "".join(d.text for d in mine) == whole[i].text
        assert mine[-1].finish_reason == whole[i].finish_reason
        assert all(d.finish_reason is None for d in mine[:-1])


def test_bad_input_is_a_clear_error(model):
    engine = Engine(model, max_seq_len=64)
    with pytest.raises(ValueError, match="context of 64"):
        engine.generate([list(range(60))], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[10**6]], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


# ---------------------------------------------------------------------------- continuous batching


def test_scheduler_staggered_requests_equal_generate(tokenizer):
    model = make_model("tiny", seed=4, vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=96)
    prompts = [tokenizer.encode("hi " * k) for k in range(1, 7)]
    params = [SamplingParams(temperature=0, max_tokens=6 + 3 * k, ignore_eos=True) for k in range(6)]
    expected = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    scheduler = Scheduler(engine).start()
    try:
        requests = []
        for p, sp in zip(prompts, params):  # more requests than rows: some wait, all join mid-flight
            requests.append(scheduler.submit(p, sp))
            time.sleep(0.005)
        got = [r.collect()[0] for r in requests]
        for g, e in zip(got, expected):
            assert g.token_ids == e.token_ids and g.text == e.text and g.finish_reason == e.finish_reason
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-4)
        # seeded sampling with n > 1 is reproducible whatever else is running
        sp = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=7)
        alone = scheduler.submit(prompts[0], sp).collect()
        other = scheduler.submit(prompts[3], SamplingParams(n=2, temperature=1.0, max_tokens=20, ignore_eos=True))
        again = scheduler.submit(prompts[0], sp).collect()
        other.collect()
        assert [a.token_ids for a in alone] == [a.token_ids for a in again]
        assert scheduler.busy_rows == 0
    finally:
        scheduler.stop()


def test_scheduler_cancel_frees_the_row_and_bounds_the_queue():
    model = make_model("tiny-dense", seed=6)
    engine = Engine(model, max_batch_size=1, max_seq_len=400)
    scheduler = Scheduler(engine, max_waiting=1).start()
    try:
        long = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=390, ignore_eos=True))
        first = next(iter(long))
        assert len(first.token_ids) == 1
        scheduler.cancel(long)
        assert long.done.wait(10)
        short = scheduler.submit([4, 5], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)).collect()
        assert len(short[0].token_ids) == 3
        assert scheduler.busy_rows == 0
    finally:
        scheduler.stop()
    idle = Scheduler(engine, max_waiting=2)  # not started: nothing leaves the queue
    idle.submit([1], SamplingParams(max_tokens=2))
    idle.submit([1], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull):
        idle.submit([1], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="max batch size"):
        idle.submit([1], SamplingParams(n=2, max_tokens=2))
    with pytest.raises(ValueError, match="context"):
        idle.submit([1] * 399, SamplingParams(max_tokens=2))


def test_generate_leaves_the_training_mode_alone():
    model = make_model("tiny", seed=8).train()
    engine = Engine(model)
    assert model.training
    engine.generate([[1, 2]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert model.training
    assert all(float(m.expert_load.sum()) == 0 for m in model.moe_layers())  # rollouts are not counted
    list(engine.stream([1, 2], SamplingParams(max_tokens=3, ignore_eos=True)))
    assert model.training
