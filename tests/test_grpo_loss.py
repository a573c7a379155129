"""GRPO loss math: hand-computed references, and parity with TRL 1.16's GRPOTrainer.

TRL parity is established through TRL's own code path: a real (tiny) `GRPOTrainer` is built
offline, its `_get_per_token_logps_and_entropies` is replaced on the instance by a function that
returns our log-prob tensor, and `trainer.compute_loss(model, inputs)` then runs TRL's
`_compute_loss` unchanged on our tensors (ratio, clipping, KL, aggregation, metrics).
"""

import math
import statistics

import pytest
import torch

from r1kit.train.grpo_loss import (
    entropy_from_logits,
    group_advantages,
    no_signal_mask,
    policy_loss,
    selective_log_softmax,
)

LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo", "gspo"]
MAX_COMPLETION_LENGTH = 8


def make_batch(dtype=torch.float64):
    """B=4 completions, T=6 positions, ragged masks (one row full, one row a single token),
    ratios spread across both clip edges, advantages of both signs and one zero."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.1
    logprobs = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    advantages = torch.tensor([1.3, -0.7, 0.0, -1.1], dtype=torch.float64)
    lengths = [6, 3, 4, 1]
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return logprobs.to(dtype), old.to(dtype), advantages.to(dtype), mask, ref.to(dtype)


# ----------------------------------------------------------------------------------------------
# 1. Hand-computed references: explicit loops over sequences and tokens on scalars


def clip(x, lo, hi):
    # A clipped ratio is a constant: it carries no gradient, which is the point of PPO's clip.
    if x.item() < lo:
        return torch.tensor(lo, dtype=x.dtype)
    if x.item() > hi:
        return torch.tensor(hi, dtype=x.dtype)
    return x


def reference_loss(logprobs, old, adv, mask, loss_type, eps_low, eps_high, beta, ref, max_len, kl_times_ratio):
    B, T = logprobs.shape
    seq_sums, seq_counts = [], []
    for i in range(B):
        active = [t for t in range(T) if mask[i, t].item() == 1]
        a = adv[i].item()
        if loss_type == "gspo":
            mean_log_ratio = sum(logprobs[i, t] - old[i, t] for t in active) / max(len(active), 1)
            s = torch.exp(mean_log_ratio)
            seq_term = -min(s * a, clip(s, 1 - eps_low, 1 + eps_high) * a)
        total = torch.zeros((), dtype=logprobs.dtype)
        for t in active:
            if loss_type == "gspo":
                r = s
                term = seq_term
            else:
                r = torch.exp(logprobs[i, t] - old[i, t])
                term = -min(r * a, clip(r, 1 - eps_low, 1 + eps_high) * a)
            if beta:
                d = ref[i, t] - logprobs[i, t]
                kl = torch.exp(d) - d - 1
                term = term + beta * (kl * r if kl_times_ratio else kl)
            total = total + term
        seq_sums.append(total)
        seq_counts.append(len(active))
    if loss_type in ("grpo", "gspo"):
        return sum(s / max(n, 1) for s, n in zip(seq_sums, seq_counts)) / B
    if loss_type in ("bnpo", "dapo"):
        return sum(seq_sums) / sum(seq_counts)
    if loss_type == "dr_grpo":
        return sum(seq_sums) / (B * max_len)
    raise AssertionError(loss_type)


CONFIGS = [  # (epsilon, epsilon_high, beta, use_bias_correction_kl)
    (0.2, None, 0.0, False),
    (0.2, 0.28, 0.0, False),
    (0.1, 0.3, 0.04, False),
    (0.2, 0.28, 0.04, True),  # TRL 1.16's default: the KL term is weighted by the ratio
]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("epsilon,epsilon_high,beta,bias_kl", CONFIGS)
def test_loss_and_grad_match_hand_reference(loss_type, epsilon, epsilon_high, beta, bias_kl):
    logprobs, old, adv, mask, ref = make_batch()
    if loss_type == "gspo":  # per-sequence ratios sit near 1; use GSPO-sized ranges so some clip
        epsilon, epsilon_high = epsilon / 20, (epsilon_high or epsilon) / 20
    eps_high = epsilon if epsilon_high is None else epsilon_high

    ours_lp = logprobs.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        ours_lp, old, adv, mask, loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high,
        beta=beta, ref_logprobs=ref if beta else None, max_completion_length=MAX_COMPLETION_LENGTH,
        use_bias_correction_kl=bias_kl,
    )
    (grad,) = torch.autograd.grad(loss, ours_lp)

    ref_lp = logprobs.clone().requires_grad_(True)
    expected = reference_loss(ref_lp, old, adv, mask, loss_type, epsilon, eps_high, beta, ref,
                              MAX_COMPLETION_LENGTH, bias_kl)
    (expected_grad,) = torch.autograd.grad(expected, ref_lp)

    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    assert grad[mask == 0].abs().max().item() == 0.0  # padding never gets gradient
    # the fixture exercises clipping on at least one side, so the comparisons above are not vacuous
    assert metrics["clip_ratio/region_mean"].item() > 0
    assert set(metrics) >= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    assert ("kl" in metrics) == bool(beta)


def test_clip_fractions_by_hand():
    # ratios exp(0.5)=1.65 (A>0: high clip), exp(-0.5)=0.61 (A<0: low clip), 1.0 (never clipped)
    logprobs = torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.5, 0.0]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    _, m = policy_loss(logprobs, old, adv, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=0.28)
    # 5 active tokens: token (0,0) is high-clipped, token (1,0) is low-clipped; (1,1) has ratio>1 but A<0
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)


def test_dapo_normalises_by_tokens_of_the_whole_step():
    logprobs, old, adv, mask, _ = make_batch()
    bnpo, _ = policy_loss(logprobs, old, adv, mask, loss_type="bnpo")
    dapo, _ = policy_loss(logprobs, old, adv, mask, loss_type="dapo")
    assert dapo.item() == pytest.approx(bnpo.item(), abs=1e-12)  # one batch: identical
    # this micro-batch is one third of the step's tokens: it contributes a third of its bnpo value
    dapo3, _ = policy_loss(logprobs, old, adv, mask, loss_type="dapo", num_items_in_batch=3 * mask.sum())
    assert dapo3.item() == pytest.approx(bnpo.item() / 3, abs=1e-12)


def test_on_policy_first_step_is_plain_policy_gradient():
    # With old == current (first of num_iterations), rho = 1, nothing clips, and the gradient of
    # the grpo loss w.r.t. logp[i, t] is -A_i / (|o_i| * B).
    logprobs, _, adv, mask, _ = make_batch()
    lp = logprobs.clone().requires_grad_(True)
    loss, m = policy_loss(lp, logprobs.detach(), adv, mask, loss_type="grpo")
    loss.backward()
    n = mask.sum(-1, keepdim=True).double()
    expected = -(adv[:, None] / (n * mask.shape[0])) * mask
    torch.testing.assert_close(lp.grad, expected, atol=1e-12, rtol=0)
    assert m["clip_ratio/region_mean"].item() == 0.0


def test_bad_arguments_raise_clear_errors():
    logprobs, old, adv, mask, _ = make_batch()
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logprobs, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logprobs, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logprobs, old, adv[:2], mask)
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 4, scale_rewards="global")


# ----------------------------------------------------------------------------------------------
# 3. Advantages


REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.1, 0.5, 1.0]  # 3 groups of 4


def test_group_advantages_by_hand():
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    expected_group, expected_none = [], []
    for k in range(3):
        group = REWARDS[4 * k : 4 * k + 4]
        mean, std = statistics.mean(group), statistics.stdev(group)  # stdev: Bessel (n - 1), as TRL
        expected_group += [(r - mean) / (std + 1e-4) for r in group]
        expected_none += [r - mean for r in group]
    batch_std = statistics.stdev(REWARDS)
    expected_batch = [a / (batch_std + 1e-4) for a in expected_none]

    for scale, expected in [("group", expected_group), (True, expected_group), ("batch", expected_batch),
                            ("none", expected_none), (False, expected_none)]:
        got = group_advantages(rewards, 4, scale_rewards=scale)
        assert got.tolist() == pytest.approx(expected, abs=1e-9), scale

    # the all-equal group gets exactly zero advantage, not 0/0
    assert group_advantages(rewards, 4)[4:8].abs().max().item() == 0.0
    # a group of two with rewards 0 and 1: std = 0.7071 (unbiased), so A = +-0.5/0.7072
    two = group_advantages(torch.tensor([0.0, 1.0]), 2)
    assert two.tolist() == pytest.approx([-0.5 / (math.sqrt(0.5) + 1e-4), 0.5 / (math.sqrt(0.5) + 1e-4)])


def test_group_advantages_match_trl_nanstd():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor(REWARDS)
    grouped = rewards.view(-1, 4)
    trl_style = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4), trl_style.reshape(-1), atol=1e-6, rtol=0)


def test_single_generation_has_zero_advantage():
    assert group_advantages(torch.tensor([0.3, 0.9]), 1).tolist() == [0.0, 0.0]


def test_no_signal_mask():
    rewards = torch.tensor(REWARDS)
    assert no_signal_mask(rewards, 4).tolist() == [False, True, False]
    assert no_signal_mask(torch.tensor([0.0, 0.0, 0.7, 0.7000001]), 2).tolist() == [True, False]


# ----------------------------------------------------------------------------------------------
# Log-probs and entropy from logits


def test_selective_log_softmax_matches_naive_values_and_grads():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ids = torch.randint(0, 17, (3, 5), generator=g)
    for temperature in (1.0, 0.7):
        ours = selective_log_softmax(logits, ids, temperature=temperature, chunk_size=4)  # ragged chunks
        naive = (logits / temperature).log_softmax(-1).gather(-1, ids[..., None])[..., 0]
        torch.testing.assert_close(ours, naive, atol=1e-12, rtol=0)
        (g1,) = torch.autograd.grad(ours.sum(), logits)
        (g2,) = torch.autograd.grad(naive.sum(), logits)
        torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)


def test_selective_log_softmax_bf16_is_computed_in_fp32():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 1000, generator=g) * 4
    ids = torch.randint(0, 1000, (2, 4), generator=g)
    from_bf16 = selective_log_softmax(logits.bfloat16(), ids)
    assert from_bf16.dtype == torch.float32
    exact = logits.bfloat16().float().log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(from_bf16, exact, atol=1e-5, rtol=0)


def test_selective_log_softmax_and_entropy_match_trl():
    from trl.trainer.utils import entropy_from_logits as trl_entropy
    from trl.trainer.utils import selective_log_softmax as trl_selective

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 33, generator=g)
    ids = torch.randint(0, 33, (2, 7), generator=g)
    torch.testing.assert_close(selective_log_softmax(logits, ids, 0.9), trl_selective(logits, ids, 0.9),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy_from_logits(logits), trl_entropy(logits), atol=1e-6, rtol=0)
    naive = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=3), naive, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy_from_logits(logits * 2, temperature=2.0), naive, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# 2. Parity with TRL 1.16's GRPOTrainer._compute_loss (TRL is a test-only dependency)


@pytest.fixture(scope="module")
def trl_trainer_factory(tmp_path_factory):
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", *"abcdefghij "])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    dataset = datasets.Dataset.from_dict({"prompt": ["ab", "cd"]})
    out = tmp_path_factory.mktemp("trl")
    # Saved to a folder and passed by path: with beta > 0 TRL loads its reference model from there.
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out / "model")

    def build(loss_type, epsilon, epsilon_high, beta, use_bias_correction_kl=True):
        gspo = loss_type == "gspo"
        args = GRPOConfig(
            output_dir=str(out), per_device_train_batch_size=4, num_generations=2,
            max_completion_length=MAX_COMPLETION_LENGTH, use_cpu=True, bf16=False, report_to="none",
            loss_type="grpo" if gspo else loss_type,
            importance_sampling_level="sequence" if gspo else "token",
            epsilon=epsilon, epsilon_high=epsilon_high, beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        )
        def reward_func(completions, **kwargs):  # never called: we only compute the loss
            return [0.0] * len(completions)

        trainer = GRPOTrainer(model=str(out / "model"), reward_funcs=reward_func, args=args,
                              train_dataset=dataset, processing_class=tokenizer)
        trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
        trainer.model.train()
        return trainer

    return build


def trl_loss(trainer, logprobs, old, adv, mask, ref, num_items_in_batch):
    """Run TRL's own _compute_loss with the model forward replaced by our log-probs."""
    B, T = logprobs.shape
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None)
    inputs = {
        "prompt_ids": torch.ones(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": torch.as_tensor(num_items_in_batch),
    }
    loss = trainer.compute_loss(trainer.model, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss, metrics


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("epsilon,epsilon_high,beta,bias_kl", CONFIGS)
def test_loss_matches_trl(trl_trainer_factory, loss_type, epsilon, epsilon_high, beta, bias_kl):
    logprobs, old, adv, mask, ref = make_batch(torch.float32)
    if loss_type == "gspo":
        epsilon, epsilon_high = epsilon / 20, (epsilon_high or epsilon) / 20
    trainer = trl_trainer_factory(loss_type, epsilon, epsilon_high, beta, bias_kl)
    num_items = mask.sum()

    theirs_lp = logprobs.clone().requires_grad_(True)
    expected, trl_metrics = trl_loss(trainer, theirs_lp, old, adv, mask, ref, num_items)
    (expected_grad,) = torch.autograd.grad(expected, theirs_lp)

    ours_lp = logprobs.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        ours_lp, old, adv, mask, loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta,
        ref_logprobs=ref if beta else None, max_completion_length=MAX_COMPLETION_LENGTH,
        num_items_in_batch=num_items, use_bias_correction_kl=bias_kl,
    )
    (grad,) = torch.autograd.grad(loss, ours_lp)

    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"):
        if name in metrics or name in trl_metrics:
            assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-6), name


def test_dapo_step_normaliser_matches_trl(trl_trainer_factory):
    # a micro-batch holding a third of the optimizer step's tokens
    logprobs, old, adv, mask, ref = make_batch(torch.float32)
    trainer = trl_trainer_factory("dapo", 0.2, 0.28, 0.0)
    expected, _ = trl_loss(trainer, logprobs, old, adv, mask, ref, 3 * mask.sum())
    loss, _ = policy_loss(logprobs, old, adv, mask, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
                          num_items_in_batch=3 * mask.sum())
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
