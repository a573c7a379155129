"""The GRPO loop (r1kit/train/grpo.py): it learns, and it survives bad input.

The objective's numbers are checked against TRL in test_grpo_loss.py; here: the loop raises held-out
accuracy on a tiny model, the engine's log-probs are the training forward's, and every failure mode
of the issue (config that does not divide, rewards that raise or return NaN, a non-finite loss, a
batch without signal) is handled as promised. Single-threaded: these models are too small to gain
from threads, and the suite shares two cores.
"""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from unittest import mock

import pytest
import torch

import r1kit
from r1kit.model import ModelConfig, Transformer
from r1kit.tasks.arithmetic import ArithmeticTask
from r1kit.tokenizer import train_tokenizer
from r1kit.train import grpo
from r1kit.train.grpo import GRPOConfig, Rollout, completion_logprobs, evaluate_pass1, score_rollout, train_grpo

TEMPLATE = "{prompt}<think>"  # the completion is the worked solution, "</think>", then the answer
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([], kind="char")


def dense_model(tok, seed=0, hidden=64, layers=2) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=160, tie_word_embeddings=True)
    return Transformer(cfg)


def toy_samples(n=8):
    return [{"prompt": f"q{i}", "answer": str(i), "task": "toy", "meta": {"id": i, "flat": i % 2 == 0}}
            for i in range(n)]


def quick_config(**kw) -> GRPOConfig:
    base = dict(template=TEMPLATE, num_generations=4, batch_size=8, max_completion_length=8, learning_rate=1e-3,
                max_steps=2, progress=False, seed=0, beta=0.0)
    base.update(kw)
    return GRPOConfig(**base)


def length_reward(text, sample):
    return float(len(text) % 3 == 0)  # varies from sample to sample: groups carry signal


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------------- it learns


def addition_base(tok):
    """A tiny char model pretrained on one-digit additions whose worked solutions come half from a
    careful solver and half from a "sloppy" one that forgets the carry: a systematic wrong mode that
    sampling at temperature 0.6 keeps and RL can remove (DESIGN.md)."""
    task = ArithmeticTask(difficulty=1)
    problems = [{"prompt": f"{a}+{b}", "answer": str(a + b), "task": "arithmetic", "meta": {"a": a, "b": b, "op": "+"}}
                for a in range(1, 10) for b in range(1, 10)]
    rng = random.Random(0)
    carry = [s for s in problems if s["meta"]["a"] + s["meta"]["b"] >= 10]
    rng.shuffle(carry)
    held_out = carry[:12]  # never prompted during RL: carry problems, where the wrong mode bites
    train = [s for s in problems if s not in held_out]
    model = dense_model(tok)
    eos = tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    model.train()
    for _ in range(320):
        rows = []
        for s in (rng.choice(problems) for _ in range(32)):
            steps, answer = task.worked_solution(s, sloppy=rng.random() < 0.5)
            prompt = tok.encode(TEMPLATE.replace("{prompt}", s["prompt"]), add_special_tokens=True)
            rows.append((prompt, tok.encode(steps + "</think>" + answer) + [eos]))
        width = max(len(p) + len(c) for p, c in rows)
        ids, mask = torch.full((len(rows), width), eos), torch.zeros(len(rows), width)
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, len(p):len(p) + len(c)] = 1
        loss = model.loss(ids, mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, task, train, held_out


@pytest.mark.parametrize("bf16", ["auto", True])
def test_grpo_raises_held_out_accuracy(tok, tmp_path, bf16, monkeypatch):
    """bf16=True: every linear product of rollouts and update in bf16 (r1kit.model.precision; on AMX
    the C decode kernels too), even the test model's small ones; it must learn as well."""
    from r1kit.model import cpu_kernels, precision
    if bf16 is True:
        monkeypatch.setattr(precision, "MIN_MACS", 0)
        modes = []
        sync = cpu_kernels.sync_mode
        monkeypatch.setattr(cpu_kernels, "sync_mode", lambda allow=True: modes.append(sync(allow)) or modes[-1])
    model, task, train, held_out = addition_base(tok)
    config = quick_config(num_generations=8, batch_size=32, max_completion_length=48, learning_rate=5e-4,
                          max_steps=20, output_dir=str(tmp_path), sample_every=10, bf16=bf16)
    verify = lambda text, s: task.verify(text, s)  # noqa: E731
    before = evaluate_pass1(model, tok, held_out, config, verify=verify, k=8)["pass@1"]
    result = train_grpo(config, model, tok, train_samples=train, reward_fn=lambda t, s: float(task.verify(t, s)))
    after = evaluate_pass1(model, tok, held_out, config, verify=verify, k=8)["pass@1"]
    print(f"held-out pass@1 {before:.3f} -> {after:.3f}")
    # the base really has the wrong mode on carry problems, and RL fixes it. Its held-out pass@1 moves
    # with its short pretraining's rounding (above 0.2 before; 0.198, then 0.052 as fused CPU kernels came)
    assert before < 0.8, before
    assert after >= before + 0.15, (before, after)
    # what a user watches is there, per step, as JSON lines
    assert len(result.history) == 20 and result.skipped_steps == 0
    for key in ("reward", "reward_std", "accuracy", "completions/mean_length", "completions/max_length",
                "completions/clipped_ratio", "frac_reward_zero_std", "clip_ratio/region_mean", "entropy",
                "time/generate", "time/update", "tokens_per_s", "grad_norm", "generate/tokens",
                "generate/prompt_tokens", "update/rows", "update/tokens"):
        assert key in result.history[-1] and math.isfinite(result.history[-1][key]), key
    last = result.history[-1]
    assert last["generate/tokens"] == round(last["completions/mean_length"] * 32)
    plens = [len(grpo.prompt_fn_for(config.template, tok)(s)) for s in train]
    assert 4 * min(plens) <= last["generate/prompt_tokens"] <= 4 * max(plens)  # 4 prompts, each prefilled once
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 2 * config.num_samples_to_log
    if bf16 is True and cpu_kernels.library() is not None and cpu_kernels.library().amx:
        assert any(modes) and not all(modes)  # rollouts' products in bf16, the output head's in float32


# ---------------------------------------------------------------------------- the engine's log-probs are the training forward's


@pytest.mark.parametrize("kind", ["dense", "mla_moe"])
def test_engine_logprobs_match_training_forward(tok, kind):
    """num_iterations = 1 trains against the engine's log-probs as pi_old: they must be exactly the
    training forward's log_softmax(logits / T) (cached decode vs one causal pass; MLA absorbed vs naive)."""
    if kind == "dense":
        model = dense_model(tok, seed=1)
    else:
        torch.manual_seed(1)
        model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_hidden_layers=2))
    config = quick_config(max_completion_length=12, temperature=0.7)
    samples = toy_samples(3)
    prompts = [tok.encode(f"{s['prompt']} and some longer text"[: 4 + 5 * i], add_special_tokens=True)
               for i, s in enumerate(samples)]  # different prompt lengths: padding must not matter
    from r1kit.engine import Engine

    engine = Engine(model, tok, max_batch_size=12, max_seq_len=64)
    with torch.inference_mode():
        rollout = grpo.generate_rollout(engine, tok, samples, prompts, config, seed=3)
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model.eval(), rollout, config.temperature)
    mask = rollout.completion_mask.bool()
    diff = (logprobs - rollout.old_logprobs).abs()[mask].max().item()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("kind", ["dense", "mla_moe"])
def test_shared_prompt_forward_gives_the_padded_forwards_logprobs_and_gradients(tok, kind):
    """share_prompts: each distinct prompt runs once into a KV cache and its rows continue from a
    copy of it; log-probs and their gradients equal the padded per-row forward's (prompts of
    different lengths, a completion with no tokens, rows of one prompt not adjacent)."""
    if kind == "dense":
        model = dense_model(tok, seed=4)
    else:
        torch.manual_seed(4)
        model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_hidden_layers=2,
                                               num_nextn_predict_layers=0))
    model.train()
    g = torch.Generator().manual_seed(0)
    prompts = [tok.encode(t, add_special_tokens=True) for t in ("1+2=", "a longer prompt: 17+25=", "9*9")]
    B, C = 9, 11
    lengths = [11, 0, 4, 7, 11, 1, 9, 3, 6]
    ids = torch.randint(5, tok.vocab_size, (B, C), generator=g)
    mask = (torch.arange(C) < torch.tensor(lengths).unsqueeze(1)).float()
    rollout = Rollout(samples=[{}] * B, prompt_ids=[prompts[i % 3] for i in range(B)], completion_ids=ids * mask.long(),
                      completion_mask=mask, old_logprobs=torch.zeros(B, C), truncated=torch.zeros(B, dtype=torch.bool),
                      texts=[""] * B)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(B, C, generator=g) * mask
    out = {}
    for share in (False, True):
        lp, _ = completion_logprobs(model, rollout, 0.7, share_prompts=share)
        grads = torch.autograd.grad((lp * weights).sum(), params, allow_unused=True)
        out[share] = (lp * mask, [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)])
    assert (out[True][0] - out[False][0]).abs().max().item() < 1e-5
    for a, b in zip(out[True][1], out[False][1]):
        assert (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1.0)


def test_update_with_shared_prompts_takes_the_same_step_and_only_on_the_plain_model(tok):
    import copy

    from r1kit.engine import Engine
    from r1kit.train.grpo_loss import group_advantages

    G = 4
    config = quick_config(num_generations=G, batch_size=4 * G, max_completion_length=10, temperature=1.0).resolved()
    base = dense_model(tok, seed=5)
    samples = toy_samples(4)
    prompts = [tok.encode(s["prompt"], add_special_tokens=True) for s in samples]
    engine = Engine(copy.deepcopy(base), tok, max_batch_size=16, max_seq_len=64)
    with torch.inference_mode():
        rollout = grpo.generate_rollout(engine, tok, samples, prompts, config, seed=2)
    rollout.rewards = torch.tensor([float(i % 3 == 0) for i in range(4 * G)])
    rollout.advantages = group_advantages(rollout.rewards, G, "group")

    passes = []

    class CountedPass(grpo.PromptPass):
        def __init__(self, *a, **k):
            passes.append(1)
            super().__init__(*a, **k)

    def one_step(share: bool):
        model = copy.deepcopy(base)
        cfg = dataclasses.replace(config, share_prompts=share)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the step is the gradient (Adam would amplify rounding)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        assert grpo.can_share_prompts(cfg, model, model) is share
        with mock.patch.object(grpo, "PromptPass", CountedPass):
            out = grpo._update(cfg, model, model, opt, sched, rollout, minibatch=len(rollout), micro=6, world_size=1,
                               step=0)
        assert out["update/rows"] == len(rollout)  # every row trained, in buckets of at most 6
        return model

    moved = 0.0
    unshared, shared = one_step(False), one_step(True)
    assert len(passes) == 1  # the prompts ran once for the minibatch's three buckets, their gradients summed
    for a, b, c in zip(unshared.parameters(), shared.parameters(), base.parameters()):
        assert (a - b).abs().max().item() < 1e-6
        moved = max(moved, (a - c).abs().max().item())
    assert moved > 1e-4  # the step did something
    # not through a wrapper (compiled forward, DDP), nor under activation checkpointing, nor with a
    # sequence-wise balance loss
    model = dense_model(tok)
    assert not grpo.can_share_prompts(config, model, torch.compile(model))
    model.gradient_checkpointing = True
    assert not grpo.can_share_prompts(config, model, model)
    moe = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, aux_loss_alpha=1e-3))
    assert not grpo.can_share_prompts(config, moe, moe)


def test_length_buckets_cover_every_row_once_and_cut_only_where_it_pays():
    lengths = [50, 12, 48, 13, 11, 49, 14, 12]
    rows = list(range(8))
    buckets = grpo.length_buckets(rows, lengths, max_rows=8, overhead_tokens=10)
    assert sorted(r for b in buckets for r in b) == rows
    assert [sorted(b) for b in buckets] == [[0, 2, 5], [1, 3, 4, 6, 7]]  # long ones apart from short ones
    # a forward that costs more than the padding saved: one bucket
    assert len(grpo.length_buckets(rows, lengths, max_rows=8, overhead_tokens=10_000)) == 1
    # never more than max_rows per bucket
    assert all(len(b) <= 3 for b in grpo.length_buckets(rows, [10] * 8, max_rows=3))


def test_bucketed_trimmed_logprobs_equal_one_padded_batch(tok):
    """The update runs length buckets with the all-padding columns trimmed: same log-probs per token."""
    model = dense_model(tok, seed=2).eval()
    config = quick_config(max_completion_length=16, temperature=1.0)
    samples = toy_samples(4)
    prompts = [tok.encode(s["prompt"] + " and more" * (3 * i), add_special_tokens=True) for i, s in enumerate(samples)]
    from r1kit.engine import Engine

    with torch.inference_mode():
        rollout = grpo.generate_rollout(Engine(model, tok, max_batch_size=16, max_seq_len=160), tok, samples, prompts,
                                        config, seed=5)
    lengths = rollout.lengths()
    assert len(set(lengths)) > 1
    with torch.no_grad():
        whole, _ = completion_logprobs(model, rollout, config.temperature)
        pieces = grpo.rollout_logprobs(model, rollout, config.temperature, micro_batch_size=3)
        # each prompt once for all buckets, the completions in buckets by their own length
        shared = grpo.rollout_logprobs(model, rollout, config.temperature, micro_batch_size=3, share_prompts=True)
    mask = rollout.completion_mask.bool()
    assert (whole - pieces).abs()[mask].max().item() < 1e-5
    assert (whole - shared).abs()[mask].max().item() < 1e-5
    assert (pieces[~mask] == 0).all() and (shared[~mask] == 0).all()


@pytest.mark.parametrize("flat_groups", [[0, 2], [0, 1, 2, 3]])
def test_update_skipping_zero_advantage_rows_takes_the_same_step(tok, flat_groups):
    """beta = 0: rows of groups whose rewards were all equal (A = 0) add nothing to the gradient;
    leaving them out of the forward gives the same parameters after the optimizer step."""
    import copy

    from r1kit.engine import Engine
    from r1kit.train.grpo_loss import group_advantages

    G, n_prompts = 4, 4
    config = quick_config(num_generations=G, batch_size=G * n_prompts, max_completion_length=12, temperature=1.0).resolved()
    base = dense_model(tok, seed=3)
    samples = toy_samples(n_prompts)
    prompts = [tok.encode(s["prompt"], add_special_tokens=True) for s in samples]
    engine = Engine(copy.deepcopy(base), tok, max_batch_size=16, max_seq_len=64)
    with torch.inference_mode():
        rollout = grpo.generate_rollout(engine, tok, samples, prompts, config, seed=1)
    rewards = torch.tensor([float(i % 3 == 0) for i in range(G * n_prompts)])
    for g in flat_groups:
        rewards[g * G:(g + 1) * G] = 1.0
    rollout.rewards = rewards
    rollout.advantages = group_advantages(rewards, G, "group")

    def one_step(skip: bool):
        model = copy.deepcopy(base)
        cfg = dataclasses.replace(config, skip_zero_advantage=skip)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():  # Adam carries moments: a step with zero gradient still moves the weights
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        out = grpo._update(cfg, model, model, opt, sched, rollout, minibatch=len(rollout), micro=5, world_size=1, step=0)
        return model, out

    full, out_full = one_step(False)
    lean, out_lean = one_step(True)
    assert out_full["update/rows_skipped"] == 0
    assert out_lean["update/rows_skipped"] == pytest.approx(min(len(flat_groups) * G, len(rollout) - 1) / len(rollout))
    # the update's own counters: every row's tokens when none is skipped, the kept rows' tokens otherwise
    lengths = rollout.lengths()
    assert (out_full["update/rows"], out_full["update/tokens"]) == (len(rollout), sum(lengths))
    kept = len(rollout) - round(out_lean["update/rows_skipped"] * len(rollout))
    assert out_lean["update/rows"] == kept and out_lean["update/tokens"] < sum(lengths)
    for a, b in zip(full.parameters(), lean.parameters()):
        assert (a - b).abs().max().item() < 1e-6
    assert all(math.isfinite(out_lean[k]) for k in ("loss", "entropy", "grad_norm"))


# ---------------------------------------------------------------------------- bad input


def test_batch_that_does_not_divide_into_groups_fails_before_launch(tok, monkeypatch):
    monkeypatch.setattr(grpo, "_make_engine", lambda *a, **k: pytest.fail("engine built before the config check"))
    with pytest.raises(ValueError, match="multiple of num_generations"):
        train_grpo(quick_config(batch_size=10, num_generations=4), dense_model(tok), tok, toy_samples(), length_reward)
    with pytest.raises(ValueError, match="num_minibatches"):
        train_grpo(quick_config(num_minibatches=3), dense_model(tok), tok, toy_samples(), length_reward)
    with pytest.raises(ValueError, match="loss_type"):
        quick_config(loss_type="ppo").resolved()


def test_reward_that_raises_or_returns_nan_scores_zero_and_is_counted(tok):
    calls = {"n": 0}

    def flaky(text, sample):
        calls["n"] += 1
        if calls["n"] % 4 == 1:
            raise RuntimeError("checker crashed")
        if calls["n"] % 4 == 2:
            return float("nan")
        return 1.0

    texts = ["a", "b", "c", "d", "e", "f", "g", "h"]
    rollout = Rollout(samples=toy_samples(8), prompt_ids=[[1]] * 8, completion_ids=torch.ones(8, 1, dtype=torch.long),
                      completion_mask=torch.ones(8, 1), old_logprobs=torch.zeros(8, 1),
                      truncated=torch.zeros(8, dtype=torch.bool), texts=texts)
    counters = score_rollout(rollout, flaky, quick_config().resolved())
    assert counters["reward_errors"] == 4 and "checker crashed" in counters["reward_error"]
    assert rollout.rewards.tolist() == [0.0, 0.0, 1.0, 1.0] * 2
    # in the loop: counted per step and in total, and training goes on
    calls["n"] = 0
    result = train_grpo(quick_config(), dense_model(tok), tok, toy_samples(), flaky)
    assert result.reward_errors == 8 and [h["reward_errors"] for h in result.history] == [4, 4]
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_non_finite_loss_skips_the_step_and_keeps_the_checkpoint_clean(tok, tmp_path):
    model = dense_model(tok)
    start = weights(model)

    def poison(module, inputs, output):  # the training forward only: generation stays healthy
        return output * float("nan") if module.training else output

    handle = model.register_forward_hook(poison)
    result = train_grpo(quick_config(output_dir=str(tmp_path), save_every=1), model, tok, toy_samples(), length_reward)
    handle.remove()
    assert result.skipped_steps == 2
    assert [h["nonfinite_loss"] for h in result.history] == [1, 1]
    assert all(torch.equal(a, b) for a, b in zip(start, weights(model)))  # the weights never saw the NaN
    import r1kit

    saved, _ = r1kit.load(tmp_path / "checkpoint-2")
    for a, b in zip(start, weights(saved)):
        assert torch.isfinite(b).all() and torch.equal(a, b)


def test_dynamic_sampling_drops_groups_without_signal_and_refills(tok):
    def reward(text, sample):  # even prompts: every completion scores 1, no signal
        return 1.0 if sample["meta"]["flat"] else length_reward(text, sample)

    config = quick_config(loss_type="dapo", batch_size=16, max_completion_length=12, max_steps=2)
    result = train_grpo(config, dense_model(tok), tok, toy_samples(8), reward)
    first = result.history[0]
    assert first["frac_reward_zero_std"] >= 0.25  # as sampled: the flat prompts
    assert first["sampling_rounds"] >= 2  # ... were dropped and more prompts were sampled
    assert first["frac_reward_zero_std_trained"] == 0.0  # the batch trained on is all signal
    # a batch where no group has signal: reported, refilled up to the limit, and the step still runs
    # (no overlong penalty: completions that run long would differ in reward by their length)
    result = train_grpo(quick_config(loss_type="dapo", max_sampling_rounds=3, overlong_buffer=0), dense_model(tok),
                        tok, toy_samples(), lambda t, s: 0.5)
    assert [h["frac_reward_zero_std"] for h in result.history] == [1.0, 1.0]
    assert [h["sampling_rounds"] for h in result.history] == [3, 3]
    assert result.skipped_steps == 0


# ---------------------------------------------------------------------------- the variants, one switch each


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_each_variant_is_one_switch(tok, loss_type):
    resolved = GRPOConfig(loss_type=loss_type).resolved()
    expect = {
        "grpo": dict(beta=0.001, epsilon=0.2, epsilon_high=0.2, scale_rewards="group", dynamic_sampling=False),
        "dr_grpo": dict(beta=0.0, scale_rewards="none", dynamic_sampling=False),
        "dapo": dict(beta=0.0, epsilon=0.2, epsilon_high=0.28, dynamic_sampling=True,
                     overlong_buffer=GRPOConfig().max_completion_length // 5),
        "gspo": dict(beta=0.0, epsilon=3e-4, epsilon_high=4e-4),
    }[loss_type]
    for key, value in expect.items():
        assert getattr(resolved, key) == value, key
    model = dense_model(tok)
    start = weights(model)
    kw = {"beta": None} if loss_type == "grpo" else {}  # grpo: R1's beta, so a reference model
    result = train_grpo(quick_config(loss_type=loss_type, **kw), model, tok, toy_samples(), length_reward)
    assert result.skipped_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(start, weights(model)))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert result.reference_model == (loss_type == "grpo")
    assert ("kl" in result.history[-1]) == (loss_type == "grpo")


def test_beta_zero_loads_no_reference_model(tok):
    result = train_grpo(quick_config(beta=0.0, max_steps=1), dense_model(tok), tok, toy_samples(), length_reward)
    assert result.reference_model is False and "kl" not in result.history[0]
    result = train_grpo(quick_config(beta=0.04, max_steps=1, ref_model_sync_steps=1), dense_model(tok), tok,
                        toy_samples(), length_reward)
    assert result.reference_model is True and result.history[0]["kl"] >= 0


def test_several_iterations_and_minibatches_and_micro_batches(tok):
    config = quick_config(batch_size=16, num_iterations=2, num_minibatches=2, micro_batch_size=4, max_steps=1,
                          gradient_checkpointing=True, loss_type="bnpo")
    result = train_grpo(config, dense_model(tok), tok, toy_samples(), length_reward)
    assert result.skipped_steps == 0 and math.isfinite(result.history[0]["loss"])


@pytest.mark.parametrize("kind", ["dense", "mla_moe"])
def test_compiled_update_takes_the_eager_step(tok, kind):
    """compile=...: the update's forward runs through torch.compile with dynamic shapes (rows and
    lengths change every step); the same rollouts give the same loss and the same new weights. The
    aot_eager backend traces what inductor would compile, without a C++ build."""
    def make():
        if kind == "dense":
            return dense_model(tok)
        torch.manual_seed(0)
        return Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0))

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for compile in (False, "aot_eager"):
        model = make()
        result = train_grpo(quick_config(max_steps=1, learning_rate=1e-3, compile=compile), model, tok,
                            toy_samples(), length_reward)
        runs[compile] = (result.history, weights(model))
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled run really traced the forward
    (h_e, w_e), (h_c, w_c) = runs[False], runs["aot_eager"]
    assert h_c[0]["completions/mean_length"] == h_e[0]["completions/mean_length"]
    assert abs(h_c[0]["loss"] - h_e[0]["loss"]) < 1e-5
    # Adam's first step moves each weight by about lr * sign(grad): a tenth of lr is a real difference
    assert max((a - b).abs().max().item() for a, b in zip(w_c, w_e)) < 1e-4


# ---------------------------------------------------------------------------- checkpoints and recipes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_continues_from_the_newest_checkpoint_exactly(tok, tmp_path, dtype):
    """Two steps, stop, resume to four: the same rewards and weights, bit for bit, as four steps in one
    run (weights, name-keyed optimizer state, scheduler, RNG, prompt draw, reference model). A bf16
    policy (the GPU recipe's dtype) keeps float32 master weights and moments in its checkpoints."""
    graded = lambda text, sample: len(text) / 8.0  # noqa: E731 (a reward with signal in every group)
    config = lambda out, steps: quick_config(output_dir=str(out), save_every=1, max_steps=steps, beta=0.04)  # noqa: E731
    policy = lambda seed=0: dense_model(tok, seed=seed).to(dtype)  # noqa: E731
    straight = train_grpo(config(tmp_path / "a", 4), policy(), tok, toy_samples(), graded)
    train_grpo(config(tmp_path / "b", 2), policy(), tok, toy_samples(), graded)
    assert (tmp_path / "b" / "checkpoint-2").is_dir()
    resumed = policy(seed=5)  # different weights: the checkpoint's must be loaded
    result = train_grpo(config(tmp_path / "b", 4), resumed, tok, toy_samples(), graded)
    assert [h["step"] for h in result.history] == [3, 4]
    assert [h["reward"] for h in result.history] == [h["reward"] for h in straight.history[2:]]
    a, _ = r1kit.load(tmp_path / "a" / "checkpoint-4", dtype=dtype)
    b, _ = r1kit.load(tmp_path / "b" / "checkpoint-4", dtype=dtype)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), policy().parameters()))
    state = torch.load(tmp_path / "b" / "checkpoint-4" / "trainer_state" / "optimizer.pt", weights_only=False)
    kept = {k: v.dtype for k, v in next(iter(state["optimizer"]["state"].values())).items() if k != "step"}
    assert kept == ({"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master": torch.float32}
                    if dtype == torch.bfloat16 else {"exp_avg": torch.float32, "exp_avg_sq": torch.float32})


def test_recipes_parse(tmp_path):
    from r1kit.train.config import read_toml

    for name in ("r1zero-countdown.toml", "grpo-gsm8k-r1-distill-qwen-1.5b.toml"):
        config, mode = grpo.config_from_dict(read_toml(ROOT / "recipes" / name), name)
        assert config.batch_size % config.num_generations == 0 and config.model
    with pytest.raises(ValueError, match="num_generation"):
        grpo.config_from_dict({"num_generation": 8}, "x.toml")
    with pytest.raises(ValueError, match="multiple of num_generations"):
        grpo.config_from_dict({"num_generations": 8, "batch_size": 12}, "x.toml")


def test_pass1_reports_its_standard_error_over_problems(tok):
    """Every second problem always right, the others always wrong: pass@1 0.5, and the standard error of
    the per-problem means, sqrt(var / n) = sqrt((4 x 0.25 / 3) / 4)."""
    samples = toy_samples(4)
    out = evaluate_pass1(dense_model(tok), tok, samples, quick_config(), k=3,
                         verify=lambda text, s: s["meta"]["flat"])
    assert out["pass@1"] == 0.5
    assert abs(out["pass@1_stderr"] - math.sqrt(1 / 12)) < 1e-12
    assert "per_problem" not in out  # only when asked (it would fill every metrics record)
    out = evaluate_pass1(dense_model(tok), tok, samples, quick_config(), k=3,
                         verify=lambda text, s: s["meta"]["flat"], per_problem=True)
    assert out["per_problem"] == [float(s["meta"]["flat"]) for s in samples]


def test_auto_shares_prompts_only_where_the_tokens_saved_pay_for_the_pass():
    """share_prompts="auto" (the default): a prompt pass is a forward and a backward of its own, so the
    update shares a minibatch's prompts only when the prompt tokens it saves exceed three forwards'
    fixed price (64 token-equivalents in float32, 256 with bf16 products); true always, false never."""
    import types

    from r1kit.model import precision

    config = quick_config().resolved()
    assert config.share_prompts == "auto"
    rows = list(range(8))

    def rollout(prompt_len):  # 8 rows, 2 distinct prompts: 6 prompts' tokens saved
        return types.SimpleNamespace(prompt_ids=[[i % 2 + 1] * prompt_len for i in rows])

    assert not grpo._prompt_pass_pays(config, rollout(20), rows)  # 120 tokens saved < 192
    assert grpo._prompt_pass_pays(config, rollout(40), rows)  # 240 > 192
    with precision.bf16_matmuls():
        assert not grpo._prompt_pass_pays(config, rollout(40), rows)  # 240 < 768: tokens are cheap in bf16
        assert grpo._prompt_pass_pays(config, rollout(200), rows)
    assert grpo._prompt_pass_pays(dataclasses.replace(config, share_prompts=True), rollout(1), rows)
    with pytest.raises(ValueError, match="share_prompts must be"):
        quick_config(share_prompts="sometimes").resolved()
