"""The GRPO objective and its variants, as pure tensor math.

Read top to bottom: log-probs of chosen tokens -> group-relative advantages -> the clipped
surrogate with a k3 KL penalty -> how per-token losses are aggregated, which is where GRPO,
Dr. GRPO, DAPO / BNPO and GSPO differ. `train/grpo.py` calls these; nothing here knows about
models, engines or rewards.

Conventions follow TRL's `GRPOTrainer` (1.16) so its names and numbers carry over:
`num_generations`, `scale_rewards`, `epsilon`, `epsilon_high`, `beta`, `loss_type`,
`max_completion_length`, `num_items_in_batch`. `tests/test_grpo_loss.py` checks the losses
against TRL's own `_compute_loss` to 1e-6.

Shapes: B completions (prompt-major: the G completions of a prompt are adjacent), T completion
positions (right-padded), V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "gspo")

# TRL adds this to the std (not to the variance) before dividing; we use the same so
# advantages, and hence every loss, match TRL's numbers exactly.
ADVANTAGE_EPS = 1e-4


# ----------------------------------------------------------------------------------------------
# Log-probs and entropy of the policy, from logits


def selective_log_softmax(
    logits: Tensor, token_ids: Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """log softmax(logits / temperature)[token_ids]: log pi(o_t | q, o_<t) of the chosen tokens.

    Equivalent to `logits.div(temperature).log_softmax(-1).gather(-1, ids[..., None])[..., 0]`,
    but never materialises a full (B, T, V) log-softmax (nor a full temperature-scaled copy):
    the flattened positions are processed `chunk_size` at a time. Half-precision logits are
    upcast one chunk at a time, so the result is float32 (bf16 log-probs are too coarse for
    exp(logp - old_logp) ratios near 1). Differentiable w.r.t. logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if token_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} must equal logits shape without the vocab "
            f"dim {tuple(logits.shape[:-1])}"
        )
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_ids = token_ids.reshape(-1, 1)
    out = []
    for chunk, ids in zip(flat_logits.split(chunk_size), flat_ids.split(chunk_size)):
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        if temperature != 1.0:
            chunk = chunk / temperature
        # log_softmax(x)_i = x_i - logsumexp(x): gather one value, reduce the row, no V-sized output.
        out.append(chunk.gather(-1, ids).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out).reshape(token_ids.shape)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Shannon entropy (nats) of softmax(logits / temperature) at each position: (..., V) -> (...).

    Chunked over positions like `selective_log_softmax`; half-precision input gives float32 output.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = logits.shape[-1]
    out = []
    for chunk in logits.reshape(-1, vocab).split(chunk_size):
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        if temperature != 1.0:
            chunk = chunk / temperature
        logp = F.log_softmax(chunk, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1])


# ----------------------------------------------------------------------------------------------
# Advantages (no value model: the group is the baseline)


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (num_groups * num_generations,), got {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of num_generations={num_generations}; "
            "pass the G completions of every prompt, prompt-major"
        )
    if torch.isnan(rewards).any():
        raise ValueError("rewards contain NaN; score every completion (a failed check scores 0.0)")
    return rewards.view(-1, num_generations)


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str | bool = "group") -> Tensor:
    """R1 Eq. 3: A_i = (r_i - mean(r_group)) / std(r_group), with TRL's exact conventions.

    scale_rewards: "group" / True divides by the group's std; "batch" by the std of the whole
    batch (the mean is still the group's); "none" / False does not divide (Dr. GRPO).
    std is the unbiased (Bessel, N-1) estimate and 1e-4 is added to the std, as in TRL, so a
    group whose rewards are all equal gets A = 0 rather than 0/0. A single completion per group
    has no std; it is treated as 0 (TRL does the same), which makes its advantage 0.
    Returns a (num_groups * num_generations,) tensor in the order of `rewards`.
    """
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if mode not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch', 'none', True or False; got {scale_rewards!r}")
    grouped = _grouped(rewards, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if mode == "none":
        return advantages.reshape(-1)
    if mode == "group":
        std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])
    else:
        std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])
    return (advantages / (std + ADVANTAGE_EPS)).reshape(-1)


def no_signal_mask(rewards: Tensor, num_generations: int) -> Tensor:
    """(num_groups,) bool: True where every completion of the group got the same reward.

    Such a group has A = 0 for all its completions, so it contributes no policy gradient (only KL).
    Log its share; DAPO's dynamic sampling drops these groups and samples more prompts.
    Expand to completions with `.repeat_interleave(num_generations)`.
    """
    grouped = _grouped(rewards, num_generations)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


# ----------------------------------------------------------------------------------------------
# The clipped surrogate with a KL penalty, per token


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """R1 Eq. 2: D_KL = pi_ref/pi - log(pi_ref/pi) - 1 per token (Schulman's k3; >= 0, unbiased)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    loss_type: str = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    use_bias_correction_kl: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """R1 Eq. 1: loss = -J = -mean[min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) - beta*D_KL].

    logprobs (B, T) are the current policy's (with grad); old_logprobs (B, T) the sampling
    policy's, ref_logprobs (B, T) the reference's (needed when beta > 0, and logged as `kl`
    whenever given); advantages (B,); completion_mask (B, T) 1 on completion tokens.

    loss_type picks the ratio and the aggregation (matches TRL 1.16 `GRPOTrainer._compute_loss`):
      grpo    per-token ratio; mean over each sequence's tokens, then mean over sequences
              (DeepSeekMath / R1: 1/G sum_i 1/|o_i| sum_t).
      bnpo    per-token ratio; sum over all tokens of this batch / their count (token-level).
      dapo    as bnpo, but divided by `num_items_in_batch`: the active tokens of the whole
              optimizer step (every micro-batch; under DDP, the global count / world size, since
              DDP averages gradients). Default: this batch's count, i.e. identical to bnpo.
      dr_grpo per-token ratio; sum over all tokens / (B * max_completion_length) (a constant).
      gspo    sequence ratio s_i = exp(mean_t(logp - old_logp)) = (pi/pi_old)^(1/|o_i|), clipped
              per sequence, then aggregated as grpo (TRL: importance_sampling_level="sequence").
    use_bias_correction_kl multiplies the per-token KL by rho (unclipped, with its gradient), which
    makes its gradient the unbiased reverse-KL gradient off-policy (DeepSeek-V3.2, arXiv 2512.02556).
    TRL 1.16 turns it on by default; R1 Eq. 2 and this function's default do not.
    None of them divides by gradient-accumulation steps; the loop does that (except for dapo,
    whose `num_items_in_batch` already spans the accumulation window).

    Returns (loss, metrics); metrics are detached 0-dim tensors named as TRL logs them:
    `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (share of tokens, or
    of sequences for gspo, where clipping removed the gradient), and `kl` (mean over tokens of the
    KL term as it enters the loss) when ref_logprobs is given.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logprobs.dim() != 2 or old_logprobs.shape != logprobs.shape or completion_mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and completion_mask "
            f"{tuple(completion_mask.shape)} must all be (B, T)"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be (B,) = {tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs (the reference policy's log-probs); or set beta=0.0")
    if ref_logprobs is not None and ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs must be (B, T) = {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (the constant divisor)")

    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # (B, 1): one advantage for all tokens of o_i
    tokens_per_seq = mask.sum(-1).clamp(min=1.0)  # an empty completion contributes 0, not NaN

    # The importance ratio rho: per token, or one per sequence (GSPO: geometric mean over its tokens).
    log_ratio = logprobs - old_logprobs
    if loss_type == "gspo":
        log_ratio = ((log_ratio * mask).sum(-1) / tokens_per_seq).unsqueeze(1)  # (B, 1)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(ratio * adv, clipped_ratio * adv)  # (B, T) or (B, 1) for gspo

    kl = None
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        if use_bias_correction_kl:
            kl = kl * ratio  # gspo: the sequence ratio weighs every token's KL
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * kl  # broadcasts gspo's (B, 1) to (B, T)

    # Aggregation: the only difference between the variants once the per-token loss exists.
    if loss_type in ("grpo", "gspo"):
        per_seq = (per_token_loss * mask).sum(-1) / tokens_per_seq
        loss = per_seq.mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dapo":
        normalizer = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = (per_token_loss * mask).sum() / normalizer.to(mask).clamp(min=1.0)
    else:  # dr_grpo
        loss = (per_token_loss * mask).sum() / (logprobs.shape[0] * max_completion_length)

    metrics = _clip_metrics(ratio, adv, mask, eps_low, eps_high)
    if kl is not None:
        metrics["kl"] = _masked_mean(kl.detach(), mask)
    return loss, metrics


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _clip_metrics(ratio: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float) -> dict[str, Tensor]:
    """Share of tokens (sequences for gspo) where the clip is active, i.e. the gradient is zero.

    Clipping only bites on one side per sign of A: below 1-eps_low when A < 0, above 1+eps_high
    when A > 0 (DAPO's clip-higher raises only the latter).
    """
    ratio = ratio.detach()
    low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
    region = torch.maximum(low, high)
    if ratio.shape[1] == 1:  # gspo: one ratio per sequence, average over sequences like TRL
        return {
            "clip_ratio/low_mean": low.mean(),
            "clip_ratio/high_mean": high.mean(),
            "clip_ratio/region_mean": region.mean(),
        }
    return {
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(region, mask),
    }
