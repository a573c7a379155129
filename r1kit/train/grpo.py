"""GRPO: R1-Zero reinforcement learning with rule-based rewards (R1 §2.2), and its variants.

One step, top to bottom (`train_grpo`):

    1. sample prompts        a seeded draw of questions from the training samples
    2. generate              the engine samples `num_generations` completions per prompt, one batched
                             call, and returns their token ids and log-probabilities
    3. rewards               rule rewards on the decoded text; a reward that raises or returns NaN
                             scores 0 and is counted
    4. advantages            normalised within each group (no value model); DAPO's dynamic sampling
                             drops groups with no signal here and samples more prompts
    5. update                `num_iterations` passes of clipped policy updates over the rollout, in
                             `num_minibatches` optimizer steps, each in micro-batches
    6. metrics               rewards per component, accuracy, lengths, clip share, KL, entropy, times
    7. checkpoint            every `save_every` steps, atomically

The objective itself lives in `grpo_loss.py` (checked against TRL); this file only feeds it.
Config names follow TRL's `GRPOConfig` where the concept is the same. `loss_type` is the one switch
between the variants, each with its paper's defaults (see `GRPOConfig.resolved`):

    grpo     R1: per-sequence mean, A = (r - mean) / std, k3 KL with `beta`, reference reset every
             `ref_model_sync_steps` steps (R1: 400)
    dr_grpo  A = r - mean, token sum over a constant (num completions x max_completion_length)
    dapo     token-level loss, clip-higher (0.2 / 0.28), no KL, dynamic sampling, soft overlong
             penalty in the last `overlong_buffer` tokens
    gspo     one clipped ratio per sequence, (pi/pi_old)^(1/|o|)

Memory: no value model; the old log-probabilities are the engine's when `num_iterations == 1`; a
reference model exists only when `beta > 0`; `gradient_checkpointing` recomputes activations.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from r1kit.allocator import keep_freed_memory
from r1kit.model import precision
from r1kit.model.transformer import Cache
from r1kit.train import distributed as dist_
from r1kit.train.grpo_loss import (
    LOSS_TYPES,
    entropy_from_logits,
    group_advantages,
    no_signal_mask,
    policy_loss,
    selective_log_softmax,
)
from r1kit.train.optim import adamw, clip_grad_norm

# ==================================================================================== config


@dataclass
class GRPOConfig:
    """Everything a GRPO run needs. `None` means "the default of `loss_type`" (see `resolved`)."""

    # --- what to train on (used by `main_from_config`; `train_grpo` takes objects instead)
    model: str | None = None  # checkpoint folder (or r1kit preset name) to start from
    task: str | None = None  # r1kit.tasks generator, e.g. "countdown", "arithmetic"
    task_kwargs: dict = field(default_factory=dict)
    dataset: str | None = None  # instead of a generator: a benchmark name ("gsm8k_train") or a JSONL file
    eval_dataset: str | None = None  # held-out benchmark for eval (default: fresh samples of `task`)
    system_prompt_suffix: str = ""  # appended to every question (R1: "Please reason step by step, ...")
    num_train_samples: int = 10_000
    shuffle_dataset: bool = True  # False: prompts in the order given (as TRL's shuffle_dataset=False)
    num_eval_samples: int = 0  # held-out samples scored every `eval_every` steps (0: none)
    template: str = "r1zero"  # "r1zero" (R1's plain template), "r1" (chat template), "plain", or "...{prompt}..."
    reward_weights: dict | None = None  # r1kit.rewards.combine weights; None: {"accuracy": 1, "format": 1} (R1)
    reward_options: dict = field(default_factory=dict)  # per-reward options, e.g. {format = {style = "r1_zero"}}

    # --- rollout
    num_generations: int = 8  # G: completions per prompt (R1-Zero: 16)
    batch_size: int = 64  # completions per step, all ranks together (R1-Zero: 512); a multiple of G
    max_completion_length: int = 256
    temperature: float = 1.0  # R1: rollouts at temperature 1
    top_p: float = 1.0
    top_k: int = 0
    rollout_backend: str = "r1kit"  # "r1kit" (r1kit.engine) or "vllm" (GPU only, optional)
    compile_generation: bool = False  # torch.compile the engine's decode step (each batch size compiles once)

    # --- objective (names as in TRL)
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo | bnpo | gspo
    beta: float | None = None  # KL coefficient; 0 loads no reference model. grpo: 0.001 (R1)
    epsilon: float | None = None  # lower clip; 0.2 (gspo: 3e-4)
    epsilon_high: float | None = None  # upper clip; = epsilon (dapo: 0.28, gspo: 4e-4)
    scale_rewards: str | bool | None = None  # "group" | "batch" | "none"; dr_grpo: "none"
    num_iterations: int = 1  # passes over each rollout (R1: 1)
    num_minibatches: int = 1  # optimizer steps per pass (R1: 16)
    micro_batch_size: int | None = None  # completions per forward/backward; None: a whole minibatch
    mask_truncated_completions: bool = False
    skip_zero_advantage: bool = True  # beta = 0: rows whose advantage is 0 add no gradient; skip their forward
    # run each group's prompt once in the update, not once per completion: True, False, or "auto" (where
    # the prompt tokens saved pay for the prompt pass's own forward and backward; see _prompt_pass_pays)
    share_prompts: bool | str = "auto"
    use_bias_correction_kl: bool = False  # TRL 1.16 defaults to True; R1's Eq. 2 does not have it
    ref_model_sync_steps: int = 0  # reset the reference to the policy every N steps (R1: 400); 0: never
    dynamic_sampling: bool | None = None  # drop groups with equal rewards, refill (dapo: on)
    max_sampling_rounds: int = 4  # generation rounds allowed to fill one batch under dynamic sampling
    overlong_buffer: int | None = None  # DAPO soft overlong penalty zone (tokens); dapo: 20% of max length
    overlong_penalty: float = 1.0  # penalty at max_completion_length

    # --- optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0  # in optimizer steps
    max_steps: int = 100
    gradient_checkpointing: bool = False
    compile: bool | str = False  # torch.compile the update's forward (True: inductor; shapes marked dynamic)
    bf16: bool | str = "auto"  # rollouts and update multiply their linear layers in bf16 on a CPU (float32 weights,
    # gradients and optimizer; r1kit.model.precision): "auto" where it pays (a CPU with AMX, a model 256+ wide),
    # True on any CPU; on GPUs see dtype
    dtype: str | None = None  # weights' dtype for main_from_config ("bfloat16" on GPU; the optimizer then keeps
    # float32 master weights, r1kit.train.optim.MasterWeightAdamW); None: float32
    device: str | None = None

    # --- what a user watches, and what survives
    log_every: int = 1
    sample_every: int = 10  # log sample completions every N steps (0: never)
    num_samples_to_log: int = 2
    eval_every: int = 0
    eval_k: int = 4  # samples per held-out problem (R1: temperature 0.6, top-p 0.95)
    output_dir: str | None = None
    save_every: int = 0
    resume: bool = True  # continue from the newest checkpoint in output_dir
    seed: int = 0
    progress: bool = True

    def resolved(self) -> "GRPOConfig":
        """A copy with every `None` replaced by the default of `loss_type`, and the config checked."""
        c = dataclasses.replace(self)
        if c.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOConfig.loss_type must be one of {', '.join(LOSS_TYPES)}, got {c.loss_type!r}")
        lt = c.loss_type
        if c.beta is None:
            c.beta = 0.001 if lt == "grpo" else 0.0  # R1-Zero's KL; DAPO, Dr. GRPO and GSPO drop it
        if c.epsilon is None:
            c.epsilon = 3e-4 if lt == "gspo" else 0.2
        if c.epsilon_high is None:
            c.epsilon_high = {"dapo": 0.28, "gspo": 4e-4}.get(lt, c.epsilon)
        if c.scale_rewards is None:
            c.scale_rewards = "none" if lt == "dr_grpo" else "group"
        if c.dynamic_sampling is None:
            c.dynamic_sampling = lt == "dapo"
        if c.overlong_buffer is None:
            c.overlong_buffer = c.max_completion_length // 5 if lt == "dapo" else 0
        c.validate()
        return c

    def validate(self, world_size: int = 1) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"GRPO config: {msg}")

        need(self.num_generations >= 2, f"num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        need(self.batch_size > 0 and self.batch_size % self.num_generations == 0,
             f"batch_size ({self.batch_size} completions) must be a multiple of num_generations "
             f"({self.num_generations}); e.g. batch_size = {max(1, self.batch_size // self.num_generations) * self.num_generations}")
        prompts = self.batch_size // self.num_generations
        need(prompts % world_size == 0,
             f"the {prompts} prompts per step (batch_size / num_generations) must divide among {world_size} "
             f"ranks; make batch_size a multiple of num_generations x {world_size} = {self.num_generations * world_size}")
        local = self.batch_size // world_size
        need(self.num_minibatches >= 1 and local % self.num_minibatches == 0,
             f"the {local} completions per rank must split into num_minibatches={self.num_minibatches} equal parts")
        mb = local // self.num_minibatches
        if self.micro_batch_size is not None:
            need(self.micro_batch_size >= 1 and mb % self.micro_batch_size == 0,
                 f"micro_batch_size={self.micro_batch_size} must divide the minibatch of {mb} completions")
        need(self.num_iterations >= 1, "num_iterations must be >= 1")
        need(self.max_completion_length >= 1, "max_completion_length must be >= 1")
        need(self.temperature > 0, "temperature must be > 0 (GRPO samples; the log-probs divide by it)")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(self.beta is None or self.beta >= 0, "beta must be >= 0")
        need(self.overlong_buffer is None or 0 <= self.overlong_buffer < self.max_completion_length,
             "overlong_buffer must be in [0, max_completion_length)")
        need(self.lr_scheduler_type in ("constant", "linear", "cosine"),
             f"lr_scheduler_type must be constant, linear or cosine, got {self.lr_scheduler_type!r}")
        need(self.rollout_backend in ("r1kit", "vllm"), f"rollout_backend must be 'r1kit' or 'vllm', got {self.rollout_backend!r}")
        need(self.max_steps >= 0, "max_steps must be >= 0")
        need(self.bf16 in (True, False, "auto"), f"bf16 must be true, false or 'auto', got {self.bf16!r}")
        need(self.share_prompts in (True, False, "auto"),
             f"share_prompts must be true, false or 'auto', got {self.share_prompts!r}")


# ==================================================================================== rollouts


@dataclass
class Rollout:
    """One step's completions, prompt-major (the G completions of a prompt are adjacent).

    The only thing passed between the generate, score and update phases: plain tensors.
    """

    samples: list[dict]  # per completion
    prompt_ids: list[list[int]]  # per completion
    completion_ids: torch.Tensor  # (B, C) right-padded
    completion_mask: torch.Tensor  # (B, C) 1.0 on completion tokens
    old_logprobs: torch.Tensor  # (B, C) log pi_old of the chosen tokens (the engine's)
    truncated: torch.Tensor  # (B,) bool: hit max_completion_length without a stop
    texts: list[str]
    rewards: torch.Tensor | None = None  # (B,)
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    advantages: torch.Tensor | None = None  # (B,)
    ref_logprobs: torch.Tensor | None = None  # (B, C)

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, rows: Sequence[int]) -> "Rollout":
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Rollout(
            samples=[self.samples[i] for i in rows], prompt_ids=[self.prompt_ids[i] for i in rows],
            completion_ids=self.completion_ids[idx], completion_mask=self.completion_mask[idx],
            old_logprobs=self.old_logprobs[idx], truncated=self.truncated[idx], texts=[self.texts[i] for i in rows],
            rewards=pick(self.rewards), reward_parts={k: v[idx] for k, v in self.reward_parts.items()},
            advantages=pick(self.advantages), ref_logprobs=pick(self.ref_logprobs),
        )

    def lengths(self) -> list[int]:
        """Prompt plus completion tokens of each row: what its forward pass costs."""
        done = self.completion_mask.sum(1).long().tolist()
        return [len(p) + n for p, n in zip(self.prompt_ids, done)]

    def trimmed(self) -> "Rollout":
        """The same rows without the completion columns that are padding in every row."""
        width = max(1, int(self.completion_mask.sum(1).max()))
        if width >= self.completion_ids.shape[1]:
            return self
        cut = lambda t: None if t is None else t[:, :width]  # noqa: E731
        return dataclasses.replace(self, completion_ids=cut(self.completion_ids),
                                   completion_mask=cut(self.completion_mask), old_logprobs=cut(self.old_logprobs),
                                   ref_logprobs=cut(self.ref_logprobs))

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        width = max(p.completion_ids.shape[1] for p in parts)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
        keys = parts[0].reward_parts.keys()
        return Rollout(
            samples=[s for p in parts for s in p.samples], prompt_ids=[s for p in parts for s in p.prompt_ids],
            completion_ids=torch.cat([pad(p.completion_ids, 0) for p in parts]),
            completion_mask=torch.cat([pad(p.completion_mask, 0) for p in parts]),
            old_logprobs=torch.cat([pad(p.old_logprobs, 0) for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]), texts=[t for p in parts for t in p.texts],
            rewards=torch.cat([p.rewards for p in parts]) if parts[0].rewards is not None else None,
            reward_parts={k: torch.cat([p.reward_parts[k] for p in parts]) for k in keys},
        )


def generate_rollout(engine, tokenizer, samples: list[dict], prompt_ids: list[list[int]], config: GRPOConfig,
                     seed: int) -> Rollout:
    """Phase 2: `num_generations` completions per prompt in one engine call."""
    from r1kit.engine import SamplingParams

    eos = tokenizer.eos_token_id
    params = SamplingParams(
        n=config.num_generations, max_tokens=config.max_completion_length, temperature=config.temperature,
        top_p=config.top_p, top_k=config.top_k, stop_token_ids=(eos,) if eos is not None else (), seed=seed,
    )
    generations = engine.generate(prompt_ids, params)
    if len(generations) != len(prompt_ids) * config.num_generations:
        raise RuntimeError(f"engine returned {len(generations)} completions for {len(prompt_ids)} prompts x "
                           f"{config.num_generations}; expected prompt-major n per prompt")
    B = len(generations)
    C = max(1, max(len(g.token_ids) for g in generations))
    ids = torch.zeros(B, C, dtype=torch.long)
    mask = torch.zeros(B, C)
    old = torch.zeros(B, C)
    truncated = torch.zeros(B, dtype=torch.bool)
    texts, out_samples, out_prompts = [], [], []
    for i, g in enumerate(generations):
        n = len(g.token_ids)
        if len(g.logprobs) != n:
            raise RuntimeError(f"engine returned {len(g.logprobs)} log-probs for {n} tokens (completion {i})")
        ids[i, :n] = torch.as_tensor(g.token_ids, dtype=torch.long)
        mask[i, :n] = 1.0
        old[i, :n] = torch.as_tensor(g.logprobs, dtype=torch.float32)
        truncated[i] = g.finish_reason == "length"
        # the reward reads text without control tokens (eos); <think> tags are kept by decode
        texts.append(tokenizer.decode(g.token_ids, skip_special_tokens=True))
        out_samples.append(samples[g.prompt_index])
        out_prompts.append(prompt_ids[g.prompt_index])
    return Rollout(out_samples, out_prompts, ids, mask, old, truncated, texts)


# ==================================================================================== rewards


def score_rollout(rollout: Rollout, reward_fn: Callable, config: GRPOConfig) -> dict[str, float]:
    """Phase 3: rewards (B,) and their named parts; returns counters for the metrics.

    A reward that raises, or returns something that is not a finite number, scores 0 for that
    completion and is counted in `reward_errors` (one broken check must not end a long run). The
    first error's message is kept so the user can find the bug.
    """
    rewards, parts, errors, first_error = [], [], 0, None
    for text, sample in zip(rollout.texts, rollout.samples):
        try:
            result = reward_fn(text, sample)
            score = float(getattr(result, "score", result))
            sub = {k: float(v) for k, v in (getattr(result, "parts", None) or {}).items()}
            if not math.isfinite(score):
                raise ValueError(f"reward returned {score}")
            sub = {k: (v if math.isfinite(v) else 0.0) for k, v in sub.items()}
        except Exception as err:  # noqa: BLE001 - a user's reward can fail in any way
            errors += 1
            first_error = first_error or f"{type(err).__name__}: {err}"
            score, sub = 0.0, {}
        rewards.append(score)
        parts.append(sub)
    rollout.rewards = torch.tensor(rewards, dtype=torch.float32)
    names = sorted({k for p in parts for k in p})
    rollout.reward_parts = {k: torch.tensor([p.get(k, 0.0) for p in parts]) for k in names}
    if config.overlong_buffer:
        # DAPO's soft overlong punishment: 0 up to L_max - buffer, then linear down to -penalty at L_max
        lengths = rollout.completion_mask.sum(1)
        start = config.max_completion_length - config.overlong_buffer
        penalty = ((lengths - start).clamp(min=0) / config.overlong_buffer).clamp(max=1) * config.overlong_penalty
        rollout.reward_parts["overlong_penalty"] = -penalty
        rollout.rewards = rollout.rewards - penalty
    return {"reward_errors": errors, "reward_error": first_error}


def accuracy_of(rollout: Rollout) -> torch.Tensor:
    """Per-completion correctness: the `accuracy` part when the reward names one, else reward >= 1."""
    for name in ("accuracy", "correct", "acc"):
        if name in rollout.reward_parts:
            return (rollout.reward_parts[name] > 0.5).float()
    return (rollout.rewards >= 1.0).float()


def default_reward_fn(weights: dict | None, options: dict | None = None):
    """R1's rule reward: accuracy and format with equal weight, or r1kit.rewards.combine(weights)."""
    from r1kit import rewards

    return rewards.combine(weights or {"accuracy": 1.0, "format": 1.0}, options or None)


# ==================================================================================== prompts


def load_train_samples(config: GRPOConfig) -> list[dict]:
    """`config.dataset` (a benchmark name or JSONL file) or `num_train_samples` of `config.task`."""
    from r1kit.tasks import load_benchmark, make_task

    if config.dataset:
        return load_benchmark(config.dataset)
    if config.task:
        return make_task(config.task, **config.task_kwargs).generate(config.num_train_samples, seed=config.seed)
    raise ValueError("GRPO needs prompts: pass train_samples, or set `task` (a generator such as "
                     "'countdown') or `dataset` (a benchmark such as 'gsm8k_train') in the config")


def prompt_fn_for(template: str, tokenizer, suffix: str = "") -> Callable[[dict], list[int]]:
    """Template name -> fn(sample) -> prompt token ids.

    "r1zero": R1's plain R1-Zero template after bos (base models); "r1": the tokenizer's chat
    template with R1's generation prompt (`<｜Assistant｜><think>\\n`); "plain": the bare question
    after bos; any other string containing "{prompt}" is used as the template.
    """
    from r1kit.tokenizer import r1_prompt, r1zero_prompt

    q = lambda s: s["prompt"] + suffix  # noqa: E731
    if template == "r1zero":
        return lambda s: tokenizer.encode(r1zero_prompt(q(s)), add_special_tokens=True)
    if template == "r1":
        return lambda s: tokenizer.encode(r1_prompt(tokenizer, q(s)))  # the template writes bos
    if template == "plain":
        return lambda s: tokenizer.encode(q(s), add_special_tokens=True)
    if "{prompt}" in template:
        return lambda s: tokenizer.encode(template.replace("{prompt}", q(s)), add_special_tokens=True)
    raise ValueError(f"unknown template {template!r}: use 'r1zero', 'r1', 'plain' or a string with '{{prompt}}'")


# ==================================================================================== the training forward


def completion_logprobs(model, rollout: Rollout, temperature: float, entropy: bool = False,
                        share_prompts: bool = False, prompts: "PromptPass | None" = None):
    """log pi(o_t | q, o_<t) for every completion token of `rollout`.

    Each row is prompt + completion, right-padded to the longest row (right padding cannot change
    a causal model's earlier positions). Position p's logits predict token p + 1, so completion
    token j of a row whose prompt has P tokens is read at position P - 1 + j. Log-probs are of
    softmax(logits / temperature), the distribution the engine sampled from.
    `prompts`: the rows' prompts already ran (a PromptPass); only the completions run here.
    `share_prompts`: rows with the same prompt run it once, here (a PromptPass of these rows).
    Returns (logprobs (B, C), entropy (B, C) or None) with C = rollout.completion_ids.shape[1].
    """
    device = next(model.parameters()).device
    if prompts is None and share_prompts and len({tuple(p) for p in rollout.prompt_ids}) < len(rollout):
        prompts = PromptPass(model, rollout.prompt_ids, rollout.completion_ids.shape[1], cut=False)
    if prompts is not None:
        logits = prompts.logits(rollout)
    else:
        B, C = rollout.completion_ids.shape
        prompt_lens = torch.tensor([len(p) for p in rollout.prompt_ids])
        total = int((prompt_lens + rollout.completion_mask.sum(1).long()).max())
        input_ids = torch.zeros(B, total, dtype=torch.long)
        for i, p in enumerate(rollout.prompt_ids):
            n = int(rollout.completion_mask[i].sum())
            input_ids[i, :len(p)] = torch.as_tensor(p)
            input_ids[i, len(p):len(p) + n] = rollout.completion_ids[i, :n]
        # where each completion token's logits are: (B, C), clamped inside the row for padding
        where = (prompt_lens.unsqueeze(1) - 1 + torch.arange(C)).clamp(max=total - 1)
        logits = model(input_ids.to(device), logits_at=where.to(device))  # (B, C, V): completion positions only
    logprobs = selective_log_softmax(logits, rollout.completion_ids.to(device), temperature)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = entropy_from_logits(logits.detach(), temperature)
    return logprobs, ent


class PromptPass:
    """Each distinct prompt of a set of rows, run once into a KV cache, for the rows' completions to
    continue from (`share_prompts`).

    A GRPO group's completions share their prompt; a padded forward runs that prompt once per
    completion, and with short completions the prompt is a large share of the tokens. Here the
    distinct prompts run once (the model's own decoding path, with gradients on), and any subset of
    the rows -- a length bucket of the update -- runs its completions on a copy of its prompts'
    cache rows, at positions P.. . The logits of completion token 0 come from the prompt's last
    position, those of token j > 0 from completion token j - 1; a completion's last token predicts
    nothing needed and is left out. Same values and gradients as the padded forward up to rounding.

    `cut=True` (the update, which runs several buckets, each with its own backward): the pass's
    outputs -- each layer's cache and the prompts' last logits -- are cut from its graph, every
    bucket's backward leaves its gradient on them, and `backward()` then sends the sum back through
    the prompt pass once. `cut=False`: one graph, for a caller that backpropagates once.
    """

    def __init__(self, model, prompt_ids: Sequence[Sequence[int]], max_completion: int, cut: bool = True):
        self.model = model
        device = next(model.parameters()).device
        self.index: dict[tuple, int] = {}
        for p in prompt_ids:
            self.index.setdefault(tuple(p), len(self.index))
        distinct = list(self.index)
        self.lens = torch.tensor([len(p) for p in distinct], device=device)
        self.P = int(self.lens.max())
        ids = torch.zeros(len(distinct), self.P, dtype=torch.long)
        for i, p in enumerate(distinct):
            ids[i, :len(p)] = torch.as_tensor(p)
        cache = model.new_cache(len(distinct), self.P + max(max_completion - 1, 0))
        positions = torch.arange(self.P, device=device).expand(len(distinct), self.P)
        first = model(ids.to(device), positions=positions, cache=cache, kv_len=self.P,
                      logits_at=(self.lens - 1).unsqueeze(1))  # (n, 1, V): completion token 0 of each prompt
        self._outputs = [first] + [t for layer in cache.layers for t in (layer if isinstance(layer, tuple) else (layer,))]
        self._cut = cut and torch.is_grad_enabled()
        self._leaves = [t.detach().requires_grad_() for t in self._outputs] if self._cut else self._outputs
        self.first, flat = self._leaves[0], iter(self._leaves[1:])
        self.layers = [tuple(next(flat) for _ in layer) if isinstance(layer, tuple) else next(flat)
                       for layer in cache.layers]

    def logits(self, rollout: Rollout) -> torch.Tensor:
        """(B, C, V): the logits that predict each completion token of `rollout`'s rows."""
        device = self.lens.device
        of_row = torch.tensor([self.index[tuple(p)] for p in rollout.prompt_ids], device=device)
        C = rollout.completion_ids.shape[1]
        first = self.first[of_row]
        if C == 1:
            return first
        S = self.P + C - 1  # the slots this bucket uses: a copy of only those
        rows = Cache([tuple(t[:, :S].index_select(0, of_row) for t in layer) if isinstance(layer, tuple)
                      else layer[:, :S].index_select(0, of_row) for layer in self.layers], S)
        start = self.lens[of_row].unsqueeze(1)  # each row's first completion slot
        tokens = rollout.completion_ids[:, :C - 1].clone()  # a normal tensor: rollouts are made under inference_mode
        rest = self.model(tokens.to(device), positions=start + torch.arange(C - 1, device=device),
                          cache=rows, kv_len=int(start.max()) + C - 1)  # (B, C - 1, V)
        return torch.cat([first, rest], dim=1)

    def backward(self) -> None:
        """After every bucket's backward: their summed gradients, back through the prompt pass."""
        if self._cut:
            pairs = [(out, leaf.grad) for out, leaf in zip(self._outputs, self._leaves) if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        self._outputs = self._leaves = self.layers = self.first = None  # the graph and the cache go now


def length_buckets(rows: list[int], lengths: list[int], max_rows: int, overhead_tokens: int = 64) -> list[list[int]]:
    """Split `rows` into micro-batches of at most `max_rows` that waste little padding.

    A padded forward costs about rows x longest row tokens, plus a fixed price per forward
    (`overhead_tokens`, in token-equivalents). Sorting by length and cutting where it pays is
    exact for that cost: a dynamic program over the sorted rows picks the cuts. Completions of a
    GRPO group often range from a few tokens to max_completion_length, so one padded batch can be
    half padding.
    """
    order = sorted(rows, key=lambda r: lengths[r], reverse=True)
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[i]: cost of the first i sorted rows
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(max(0, i - max_rows), i):  # a bucket order[j:i], its longest row is order[j]
            cost = best[j] + (i - j) * lengths[order[j]] + overhead_tokens
            if cost < best[i]:
                best[i], cut[i] = cost, j
    buckets, i = [], n
    while i > 0:
        buckets.append(order[cut[i]:i])
        i = cut[i]
    return buckets[::-1]


def _prompt_pass(model, rollout: Rollout, rows: list[int]) -> PromptPass | None:
    """A PromptPass over `rows` when some of them share a prompt, else None (nothing to share)."""
    prompt_ids = [rollout.prompt_ids[r] for r in rows]
    if len({tuple(p) for p in prompt_ids}) == len(prompt_ids):
        return None
    width = max(1, int(rollout.completion_mask[rows].sum(1).max()))
    return PromptPass(model, prompt_ids, width)


def _buckets(rollout: Rollout, rows: list[int], max_rows: int, prompts: PromptPass | None) -> list[list[int]]:
    """Length buckets of `rows`. After a PromptPass only the completions run per bucket, so they are
    sorted by completion length; else by prompt + completion.
    With bf16 products (precision.bf16_matmuls) a token costs a fraction of float32's while a
    forward's fixed price stays: fewer, longer buckets (the 3M-parameter GRPO bench model's update on
    this AMX CPU: 0.173 -> 0.147 s at 256 token-equivalents instead of 64; 1024 and one bucket, 0.15)."""
    if prompts is None:
        return length_buckets(rows, rollout.lengths(), max_rows, _forward_overhead())
    return length_buckets(rows, rollout.completion_mask.sum(1).long().tolist(), max_rows, _forward_overhead())


def _forward_overhead() -> int:
    """A forward's fixed price in token-equivalents (see _buckets)."""
    return 256 if precision.bf16_on() else 64


# A PromptPass is a forward and a backward of their own, and every bucket copies its prompts' cache
# rows: "auto" shares the prompts when the prompt tokens it saves exceed this many forwards' fixed
# price. Interleaved on saved bases (GRPO bench, 32 rows, ~500 prompt tokens saved, bf16 products):
# sharing cost 0.130 against 0.120 s per step (tiny) and 0.728 against 0.686 s (25M), about 2.5-2.8
# forwards' price more than it saved.
PROMPT_PASS_FORWARDS = 3


def _prompt_pass_pays(config, rollout: Rollout, rows: list[int]) -> bool:
    """Whether the update runs `rows`' prompts once (share_prompts True, or "auto" and it pays)."""
    if config.share_prompts is True:
        return True
    distinct = {tuple(rollout.prompt_ids[r]) for r in rows}
    saved = sum(len(rollout.prompt_ids[r]) for r in rows) - sum(len(p) for p in distinct)
    return saved > PROMPT_PASS_FORWARDS * _forward_overhead()


@torch.no_grad()
def rollout_logprobs(model, rollout: Rollout, temperature: float, micro_batch_size: int,
                     share_prompts: bool = False) -> torch.Tensor:
    """Log-probs under `model` without gradients (reference model, or re-computed old policy)."""
    was_training = model.training
    model.eval()
    out = torch.zeros_like(rollout.completion_mask)
    rows = list(range(len(rollout)))
    prompts = _prompt_pass(model, rollout, rows) if share_prompts else None
    for bucket in _buckets(rollout, rows, micro_batch_size, prompts):
        part = rollout.select(bucket).trimmed()
        lp, _ = completion_logprobs(model, part, temperature, prompts=prompts)
        out[bucket, :lp.shape[1]] = lp.float().cpu() * part.completion_mask
    model.train(was_training)
    return out


# ==================================================================================== results and logs


@dataclass
class GRPOResult:
    history: list[dict]  # one dict of metrics per step
    steps: int
    skipped_steps: int  # optimizer steps skipped for a non-finite loss or gradient
    reward_errors: int  # completions whose reward raised or returned NaN (scored 0)
    output_dir: str | None = None
    final_eval: dict | None = None
    reference_model: bool = False  # whether a reference model was allocated (only when beta > 0)


class _Log:
    """Metrics as JSON lines, samples every N steps, a progress bar on a terminal."""

    def __init__(self, config: GRPOConfig, is_main: bool, start_step: int):
        self.config = config
        self.is_main = is_main
        self.dir = Path(config.output_dir) if config.output_dir else None
        self.bar = None
        if is_main and config.progress:
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)

                self.bar = Progress(TextColumn("grpo"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                    disable=not sys.stderr.isatty(), console=None)
                self.task = self.bar.add_task("grpo", total=config.max_steps, completed=start_step, info="")
                self.bar.start()
            except ImportError:
                self.bar = None

    def _append(self, name: str, record: dict) -> None:
        if self.dir is None or not self.is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def step(self, metrics: dict) -> None:
        if not self.is_main:
            return
        self._append("metrics.jsonl", metrics)
        info = (f"reward {metrics['reward']:.3f} acc {metrics['accuracy']:.3f} "
                f"len {metrics['completions/mean_length']:.0f} {metrics['time/step']:.2f}s/step")
        if self.bar is not None and not self.bar.disable:
            self.bar.update(self.task, completed=metrics["step"], info=info)
        elif self.config.log_every and metrics["step"] % self.config.log_every == 0 and self.config.progress:
            print(f"grpo step {metrics['step']}/{self.config.max_steps} {info}", file=sys.stderr, flush=True)

    def samples(self, step: int, rollout: Rollout, tokenizer) -> None:
        if not self.is_main:
            return
        G = self.config.num_generations
        for i in range(0, min(len(rollout), self.config.num_samples_to_log * G), G):
            record = {"step": step, "prompt": rollout.samples[i]["prompt"], "answer": str(rollout.samples[i].get("answer")),
                      "completion": rollout.texts[i], "reward": float(rollout.rewards[i])}
            self._append("samples.jsonl", record)
            if self.bar is None or self.bar.disable:
                if self.config.progress:
                    print(f"  sample @ {step}: {record['completion'][:200]!r} -> reward {record['reward']:.2f}",
                          file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ==================================================================================== the loop


def _lr_lambda(config: GRPOConfig, total: int):
    def f(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        if config.lr_scheduler_type == "linear":
            return max(0.0, 1 - progress)
        if config.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return f


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Average scalar metrics over ranks (each rank holds the same number of completions)."""
    if world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = dist_.all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size for k, v in zip(keys, t.tolist())}


@contextlib.contextmanager
def whole_weights(model):
    """FSDP2 (a model sharded in place by `wrap_for_update`): gather every shard once for the engine
    and keep the weights whole while it decodes, then shard them again. Gathering outside inference
    mode matters: FSDP keeps the buffers of its first gather, and ones made under the engine's
    inference mode could not be written by the update's gathers. Any other model: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield
        return
    with torch.no_grad():
        for m in sharded:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)  # not after each decode step's forward
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def _make_engine(model, tokenizer, config: GRPOConfig, max_prompt_len: int, local_completions: int):
    if config.rollout_backend == "vllm":
        from r1kit.rollout_vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, max_seq_len=max_prompt_len + config.max_completion_length)
    from r1kit.engine import Engine

    return Engine(model, tokenizer, max_batch_size=local_completions,
                  max_seq_len=max_prompt_len + config.max_completion_length + 1, compile=config.compile_generation)


def train_grpo(
    config: GRPOConfig,
    model,
    tokenizer,
    train_samples: Sequence[dict] | None = None,
    reward_fn: Callable | None = None,
    eval_fn: Callable | None = None,
    callback: Callable[[dict], Any] | None = None,
    prompt_fn: Callable[[dict], list[int]] | None = None,
    train_model=None,
) -> GRPOResult:
    """Train `model` with GRPO in place and return the per-step metrics.

    train_samples: Samples to draw prompts from (default: `config.task`'s generator).
    reward_fn: fn(completion_text, sample) -> float or RewardResult (default: the task's rule
        reward through r1kit.rewards.combine(config.reward_weights)).
    eval_fn: fn(model, step) -> dict of metrics, run every `eval_every` steps and at the end.
    callback: fn(metrics) after each step; returning False stops training.
    prompt_fn: fn(sample) -> prompt ids (default: `config.template`).
    train_model: the wrapped module to run the update through (DDP / FSDP2); default `model`.
    Under torchrun each rank generates batch_size / world_size completions (whole groups).
    """
    rank, world_size = _world()
    config = config.resolved()
    config.validate(world_size)
    torch.manual_seed(config.seed + rank)
    if train_samples is None:
        train_samples = load_train_samples(config)
    if reward_fn is None:
        reward_fn = default_reward_fn(config.reward_weights, config.reward_options)
    train_samples = list(train_samples)
    if not train_samples:
        raise ValueError("train_samples is empty: GRPO needs prompts to sample")
    prompt_fn = prompt_fn or prompt_fn_for(config.template, tokenizer, config.system_prompt_suffix)
    train_model = train_model or model
    if config.compile:  # rows and lengths change every step: one dynamic-shape graph, not one per shape
        train_model = torch.compile(train_model, dynamic=True,
                                    backend="inductor" if config.compile is True else config.compile)
    device = next(model.parameters()).device
    if device.type == "cpu":  # every step frees and retakes the same large buffers: keep them (allocator.py)
        keep_freed_memory()
    # the rollouts' and the update's products in bf16 (float32 weights): where AMX makes them several times
    # faster. Both round the same weights and activations to bf16: pi_old and pi differ by their sums' order
    mixed = precision.wanted(config.bf16, device, getattr(getattr(model, "config", None), "hidden_size", None))

    G = config.num_generations
    local_completions = config.batch_size // world_size
    local_prompts = local_completions // G
    minibatch = local_completions // config.num_minibatches
    micro = config.micro_batch_size or minibatch
    prompt_cache: dict[int, list[int]] = {}

    def prompt_ids_of(i: int) -> list[int]:
        if i not in prompt_cache:
            prompt_cache[i] = prompt_fn(train_samples[i])
        return prompt_cache[i]

    max_prompt_len = max(len(prompt_ids_of(i)) for i in range(min(len(train_samples), 256)))
    max_prompt_len = int(max_prompt_len * 1.5) + 8  # samples beyond the first 256 may be longer

    # --- optimizer, schedule, reference model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                      weight_decay=config.weight_decay)
    total_opt_steps = config.max_steps * config.num_iterations * config.num_minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_opt_steps))
    ref_model = None
    if config.beta > 0:  # beta = 0: no reference model at all (no memory, no forward)
        ref_model = _reference_copy(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing = True
    engine = _make_engine(model, tokenizer, config, max_prompt_len, local_completions)

    start_step, history, _resumed_draw = 0, [], {}
    if config.output_dir and config.resume:
        start_step, _resumed_draw = _maybe_resume(config, model, optimizer, scheduler, ref_model)
    log = _Log(config, rank == 0, start_step)
    totals = {"skipped_steps": 0, "reward_errors": 0}
    # prompts are drawn without replacement, epoch by epoch, in the same order on every rank; the
    # position (epoch, cursor) is saved with each checkpoint so a resumed run draws what it would have
    draw = {"epoch": 0, "cursor": 0}
    if start_step:
        draw.update(_resumed_draw)

    def next_prompts(n_global: int) -> list[int]:
        picked = []
        while len(picked) < n_global:
            order = list(range(len(train_samples)))
            if config.shuffle_dataset:
                random.Random(config.seed * 1_000_003 + draw["epoch"]).shuffle(order)
            take = min(n_global - len(picked), len(order) - draw["cursor"])
            picked += order[draw["cursor"]:draw["cursor"] + take]
            draw["cursor"] += take
            if draw["cursor"] >= len(order):
                draw["epoch"], draw["cursor"] = draw["epoch"] + 1, 0
        share = n_global // world_size
        return picked[rank * share:(rank + 1) * share]

    final_eval = None
    try:
        for step in range(start_step, config.max_steps):
            t0 = time.perf_counter()
            metrics: dict[str, Any] = {"step": step + 1}

            # ---- 1-4. sample prompts, generate, score, advantages (refill under dynamic sampling)
            model.eval()
            if hasattr(engine, "sync_weights"):  # an external backend (vLLM) holds its own copy of the weights
                engine.sync_weights(model)
            kept: list[Rollout] = []
            dropped: list[Rollout] = []
            gen_time, gen_tokens, prompt_tokens, rounds, first_no_signal = 0.0, 0, 0, 0, None
            errors, first_error = 0, None
            # FSDP: the shards gathered once for all rounds (ranks may run different numbers of them)
            with whole_weights(model):
                while True:
                    rounds += 1
                    idx = next_prompts(local_prompts * world_size)
                    samples = [train_samples[i] for i in idx]
                    tg = time.perf_counter()
                    with torch.inference_mode(), precision.bf16_matmuls(mixed):
                        rollout = generate_rollout(engine, tokenizer, samples, [prompt_ids_of(i) for i in idx], config,
                                                   seed=config.seed * 1_000_003 + step * 1009 + rounds * 31 + rank)
                    gen_time += time.perf_counter() - tg
                    gen_tokens += int(rollout.completion_mask.sum())
                    prompt_tokens += sum(len(prompt_ids_of(i)) for i in idx)  # prefilled once per prompt, not per sample
                    counters = score_rollout(rollout, reward_fn, config)
                    errors += counters["reward_errors"]
                    first_error = first_error or counters["reward_error"]
                    flat = no_signal_mask(rollout.rewards, G)
                    if first_no_signal is None:
                        first_no_signal, first_rollout = float(flat.float().mean()), rollout
                    if not config.dynamic_sampling:
                        kept.append(rollout)
                        break
                    rows = lambda groups: [g * G + j for g in groups for j in range(G)]  # noqa: E731
                    good = [g for g in range(len(flat)) if not flat[g]]
                    bad = [g for g in range(len(flat)) if flat[g]]
                    if good:
                        kept.append(rollout.select(rows(good)))
                    if bad:
                        dropped.append(rollout.select(rows(bad)))
                    have = sum(len(r) for r in kept)
                    if have >= local_completions or rounds >= config.max_sampling_rounds:
                        break
            rollout = Rollout.concat(kept + dropped)  # signal first; no-signal groups only fill the remainder
            rollout = rollout.select(list(range(local_completions)))
            rollout.advantages = group_advantages(rollout.rewards, G, config.scale_rewards)
            if config.mask_truncated_completions:
                rollout.completion_mask = rollout.completion_mask * (~rollout.truncated).float().unsqueeze(1)
            totals["reward_errors"] += errors
            no_signal_now = float(no_signal_mask(rollout.rewards, G).float().mean())

            # ---- 5. update: num_iterations passes, num_minibatches optimizer steps each
            tu = time.perf_counter()
            with precision.bf16_matmuls(mixed):
                if config.num_iterations > 1 or getattr(engine, "recompute_old_logprobs", False):
                    # several passes (or a backend with other numerics, vLLM): pi_old in the training forward's numerics
                    rollout.old_logprobs = rollout_logprobs(model, rollout, config.temperature, micro,
                                                            can_share_prompts(config, model, model))
                if ref_model is not None:
                    if config.ref_model_sync_steps and step > 0 and step % config.ref_model_sync_steps == 0:
                        ref_model.load_state_dict(model.state_dict())  # R1: the reference becomes the policy
                    rollout.ref_logprobs = rollout_logprobs(ref_model, rollout, config.temperature, micro,
                                                            can_share_prompts(config, ref_model, ref_model))
                upd = _update(config, model, train_model, optimizer, scheduler, rollout, minibatch, micro, world_size,
                              step)
            totals["skipped_steps"] += upd.pop("skipped")
            update_time = time.perf_counter() - tu

            # ---- 6. metrics
            step_time = time.perf_counter() - t0
            metrics.update(_rollout_metrics(first_rollout, rollout, G))
            metrics.update(upd)
            metrics.update({
                "frac_reward_zero_std": first_no_signal,  # groups with no learning signal, as sampled
                "frac_reward_zero_std_trained": no_signal_now,
                "sampling_rounds": rounds,
                "reward_errors": errors,
                "time/generate": gen_time,
                "time/update": update_time,
                "time/step": step_time,
                "tokens_per_s": gen_tokens / max(step_time, 1e-9),
                "gen_tokens_per_s": gen_tokens / max(gen_time, 1e-9),
                "generate/tokens": gen_tokens,  # sampled completion tokens
                "generate/prompt_tokens": prompt_tokens,  # prompt tokens prefilled
                "lr": scheduler.get_last_lr()[0],
            })
            metrics = {**_all_mean({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                                   world_size), "step": step + 1}
            metrics["completions/max_length"] = float(first_rollout.completion_mask.sum(1).max())
            metrics["skipped_steps_total"] = totals["skipped_steps"]
            if first_error:
                metrics["reward_error"] = first_error
            if eval_fn is not None and config.eval_every and (step + 1) % config.eval_every == 0:
                model.eval()
                with whole_weights(model):
                    metrics.update({f"eval/{k}": v for k, v in eval_fn(model, step + 1).items()})
            history.append(metrics)
            log.step(metrics)
            if config.sample_every and (step + 1) % config.sample_every == 0:
                log.samples(step + 1, first_rollout, tokenizer)

            # ---- 7. checkpoint
            if config.output_dir and config.save_every and (step + 1) % config.save_every == 0:
                _save(config, model, tokenizer, optimizer, scheduler, ref_model, step + 1, rank, dict(draw))
            if callback is not None and callback(metrics) is False:
                break
        if eval_fn is not None:
            model.eval()
            with whole_weights(model):
                final_eval = eval_fn(model, len(history) + start_step)
        if config.output_dir and config.save_every and history and history[-1]["step"] % config.save_every:
            _save(config, model, tokenizer, optimizer, scheduler, ref_model, history[-1]["step"], rank, dict(draw))
    finally:
        log.close()
        model.gradient_checkpointing = False
        model.eval()
    return GRPOResult(history=history, steps=len(history), skipped_steps=totals["skipped_steps"],
                      reward_errors=totals["reward_errors"], output_dir=config.output_dir, final_eval=final_eval,
                      reference_model=ref_model is not None)


def _update(config, model, train_model, optimizer, scheduler, rollout: Rollout, minibatch: int, micro: int,
            world_size: int, step: int) -> dict:
    """Phase 5. Each minibatch is one optimizer step, its micro-batches accumulate gradients.

    Micro-batch losses are weighted by their share of the minibatch's completions, so a minibatch
    split into micro-batches gives the gradient of the whole minibatch (grpo, dr_grpo, gspo; bnpo
    normalises by each micro-batch's tokens, as TRL does);
    dapo normalises by the minibatch's active tokens (over all ranks / world size: DDP averages).
    A non-finite loss or gradient skips the optimizer step; the parameters stay as they were. The
    backward still runs, so every DDP rank joins the same all-reduce and all of them skip together.
    """
    model.train()
    B = len(rollout)
    gen = torch.Generator().manual_seed(config.seed * 7919 + step)
    sums: dict[str, float] = {}
    count, skipped, nonfinite_loss, rows_skipped, rows_trained, tokens_trained = 0, 0, 0, 0, 0, 0
    no_gradient = _rows_without_gradient(config, model, rollout)
    lengths = rollout.lengths()
    share = can_share_prompts(config, model, train_model)
    from torch.nn.parallel import DistributedDataParallel

    mode = "ddp" if isinstance(train_model, DistributedDataParallel) else "fsdp" if dist_.is_sharded(model) else "none"
    for _ in range(config.num_iterations):
        perm = torch.randperm(B, generator=gen).tolist() if config.num_minibatches > 1 else list(range(B))
        for start in range(0, B, minibatch):
            mb_rows = perm[start:start + minibatch]
            num_items = rollout.completion_mask[mb_rows].sum()
            if world_size > 1 and config.loss_type == "dapo":
                num_items = dist_.all_reduce_sum(num_items.to(next(model.parameters()).device)) / world_size
            optimizer.zero_grad(set_to_none=True)
            bad = False
            # length buckets and skipped rows: not under DDP (every rank must run the same number of
            # backward passes), not for bnpo (it normalises by each micro-batch's own tokens, as TRL does)
            if world_size == 1 and config.loss_type != "bnpo":
                train_rows = [r for r in mb_rows if r not in no_gradient] if no_gradient else mb_rows
                if not train_rows:  # one short row still runs: its zero gradient steps Adam as the full pass would
                    train_rows = [min(mb_rows, key=lengths.__getitem__)]
                rows_skipped += len(mb_rows) - len(train_rows)
                pays = share and _prompt_pass_pays(config, rollout, train_rows)
                prompts = _prompt_pass(train_model, rollout, train_rows) if pays else None
                chunks = _buckets(rollout, train_rows, micro, prompts)
            else:
                pays = share and _prompt_pass_pays(config, rollout, mb_rows)
                prompts = _prompt_pass(train_model, rollout, mb_rows) if pays else None
                chunks = [mb_rows[ms:ms + micro] for ms in range(0, len(mb_rows), micro)]
            for i, rows in enumerate(chunks):
                rows_trained += len(rows)
                tokens_trained += sum(lengths[r] for r in rows)
                part = rollout.select(rows).trimmed()
                device = next(model.parameters()).device
                logprobs, ent = completion_logprobs(train_model, part, config.temperature, entropy=True,
                                                    prompts=prompts)
                mask = part.completion_mask.to(device)
                loss, m = policy_loss(
                    logprobs, part.old_logprobs.to(device), part.advantages.to(device), mask,
                    loss_type=config.loss_type, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                    beta=config.beta, ref_logprobs=None if part.ref_logprobs is None else part.ref_logprobs.to(device),
                    max_completion_length=config.max_completion_length,
                    num_items_in_batch=num_items if config.loss_type == "dapo" else None,
                    use_bias_correction_kl=config.use_bias_correction_kl,
                )
                m["loss"] = loss.detach()  # this micro-batch's own value, for the log
                if config.loss_type != "dapo":
                    loss = loss * (len(rows) / len(mb_rows))
                aux = [moe.aux_loss for moe in getattr(model, "moe_layers", lambda: [])() if moe.aux_loss is not None]
                if aux:  # DeepSeek-V3's sequence-wise balance term, when the config has one
                    loss = loss + sum(aux) * (len(rows) / len(mb_rows))
                if not torch.isfinite(loss):
                    bad = True
                # even when non-finite: DDP ranks must all reach the all-reduce, which only the last
                # micro-batch of the minibatch runs (the others' gradients accumulate locally)
                with dist_.no_sync(train_model, mode, last_micro_step=i == len(chunks) - 1):
                    loss.backward()
                m["entropy"] = (ent * mask).sum() / mask.sum().clamp(min=1)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            if prompts is not None:
                prompts.backward()  # the buckets' gradients, through the one prompt pass
            grad_norm = clip_grad_norm(model.parameters(), config.max_grad_norm)
            if world_size > 1:  # one rank's non-finite loss skips the step on every rank, or they drift apart
                bad = bool(dist_.all_reduce_sum(torch.tensor([float(bad)]))[0] > 0)
            if bad or not torch.isfinite(grad_norm):
                # skip: no optimizer step, no scheduler step; Adam's moments and the weights stay clean
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                nonfinite_loss += int(bad)
                continue
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
            optimizer.step()
            scheduler.step()
            if hasattr(model, "update_router_bias"):
                model.update_router_bias()  # DeepSeek's aux-loss-free balancing, after every optimizer step
    optimizer.zero_grad(set_to_none=True)
    n_steps = config.num_iterations * math.ceil(B / minibatch)
    out = {k: (v / max(count, 1)) for k, v in sums.items() if k != "grad_norm"}
    out = {("clip_ratio/" + k.split("/", 1)[1] if k.startswith("clip_ratio/") else k): v for k, v in out.items()}
    if "grad_norm" in sums:
        out["grad_norm"] = sums["grad_norm"] / max(1, n_steps - skipped)
    out["skipped"] = skipped
    out["skipped_optimizer_steps"] = skipped
    out["update/rows_skipped"] = rows_skipped / max(1, config.num_iterations * B)
    out["update/rows"] = rows_trained  # forward and backward passes over rows, all iterations
    out["update/tokens"] = tokens_trained  # their prompt + completion tokens (padding not counted)
    out["nonfinite_loss"] = nonfinite_loss
    return out


def can_share_prompts(config, model, train_model) -> bool:
    """Whether the update may run each prompt once for its rows (PromptPass): on the plain
    model only, and not under torch.distributed -- a compiled forward, DDP and FSDP expect one
    forward per backward; activation checkpointing would write the KV cache again when it
    recomputes -- and not when a sequence-wise balance loss is on (it reads each forward's routing
    as whole sequences)."""
    if not config.share_prompts or train_model is not model or getattr(model, "gradient_checkpointing", False):
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # FSDP2 shards the module in place
        return False
    cfg = getattr(model, "config", None)
    return not (getattr(cfg, "aux_loss_alpha", 0) and getattr(cfg, "is_moe", False)) and hasattr(model, "new_cache")


def _rows_without_gradient(config, model, rollout: Rollout) -> set[int]:
    """Rows the update may leave out without changing the gradient: with no KL term (beta = 0),
    a row whose advantage is exactly 0 (its group's rewards were all equal) or that has no
    completion token left adds exactly 0 to every variant's loss and gradient. The losses keep
    their denominators (the minibatch's rows and tokens), so the step is the same as with them in.
    Often half the groups early in R1-Zero training, a forward and backward saved for each row.
    What changes: `entropy` and `loss` are logged over the rows that ran, and an MoE model's expert
    load (for the balancing bias) counts only their tokens. Not when a sequence-wise balance loss
    is on: it sees every row's routing."""
    if not config.skip_zero_advantage or config.beta != 0 or rollout.advantages is None:
        return set()
    if getattr(model.config, "aux_loss_alpha", 0) and getattr(model.config, "is_moe", False):
        return set()
    zero = (rollout.advantages == 0) | (rollout.completion_mask.sum(1) == 0)
    return set(torch.nonzero(zero).flatten().tolist())


def _rollout_metrics(sampled: Rollout, trained: Rollout, G: int) -> dict:
    """What the user watches about the completions as sampled (before any refill)."""
    r = sampled
    lengths = r.completion_mask.sum(1)
    out = {
        "reward": float(r.rewards.mean()),
        "reward_std": float(r.rewards.view(-1, G).std(dim=1).mean()),  # mean within-group std (TRL)
        "accuracy": float(accuracy_of(r).mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/clipped_ratio": float(r.truncated.float().mean()),  # share truncated at max length
    }
    for name, values in r.reward_parts.items():
        out[f"rewards/{name}/mean"] = float(values.mean())
        out[f"rewards/{name}/std"] = float(values.std()) if len(values) > 1 else 0.0
    out["advantages/abs_mean"] = float(trained.advantages.abs().mean())
    return out


# ==================================================================================== checkpoints


def _save(config, model, tokenizer, optimizer, scheduler, ref_model, step: int, rank: int, draw: dict) -> None:
    """checkpoint-<step>: a Hugging Face folder plus trainer_state/ (r1kit.train.trainer_state), atomic.

    Every rank calls this: under FSDP the weights, the optimizer state and the reference model are
    gathered collectively; rank 0 writes. The optimizer state is keyed by parameter name (as SFT's),
    and every rank's RNG state is kept. A step whose loss or gradient was not finite never reached
    the weights; they are checked once more here, so a checkpoint with non-finite weights is never
    written.
    """
    from r1kit.train import trainer_state as ts

    to_save = dist_.saveable_model(model)
    optim_state = dist_.full_optimizer_state(model, optimizer)
    ref_state = None
    if ref_model is not None:
        ref_state = (dist_.full_model_state(ref_model, "fsdp") if dist_.is_sharded(ref_model)
                     else ref_model.state_dict())
    rngs = dist_.all_gather_object(ts.rng_state())
    if rank != 0:
        return
    if any(not torch.isfinite(p).all() for p in to_save.parameters()):
        print(f"grpo: weights are not finite at step {step}; checkpoint not written", file=sys.stderr)
        return
    ts.save_checkpoint(
        config.output_dir, step, to_save, tokenizer,
        optimizer_state={"optimizer": optim_state, "ref_model": ref_state},
        scheduler_state=scheduler.state_dict(), rng_states=rngs,
        state={"step": step, "kind": "grpo", "draw": draw, "config": dataclasses.asdict(config)},
    )


def _maybe_resume(config, model, optimizer, scheduler, ref_model) -> tuple[int, dict]:
    """Continue from the newest complete checkpoint in output_dir; returns the step reached (0: none)."""
    from r1kit.model.hf import load_model
    from r1kit.train import trainer_state as ts

    found = ts.list_checkpoints(config.output_dir)
    if not found:
        return 0, {}
    step, path = found[-1]
    dist_.load_full_model_state(model, load_model(path).state_dict())
    state = ts.load_trainer_state(path)
    optim_state = state["optimizer"]["optimizer"]
    groups = optim_state.get("param_groups") or [{}]
    if any(isinstance(i, int) for i in groups[0].get("params", [])):
        optimizer.load_state_dict(optim_state)  # a checkpoint from before name-keyed optimizer states
    else:
        dist_.load_optimizer_state(model, optimizer, optim_state)
    scheduler.load_state_dict(state["scheduler"])
    rank, _ = _world()
    rngs = state["rng"]
    ts.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    if ref_model is not None and state["optimizer"].get("ref_model") is not None:
        dist_.load_full_model_state(ref_model, state["optimizer"]["ref_model"])
    print(f"grpo: resumed from {path} (step {step})", file=sys.stderr)
    return int(state["step"]), dict(state.get("draw") or {})


# ==================================================================================== command line


def config_from_dict(cfg: dict, source: str = "config") -> tuple[GRPOConfig, str]:
    """(GRPOConfig, distributed mode) from a parsed recipe; unknown keys and wrong types name the key."""
    from r1kit.train import config as recipe

    table = dict(cfg["grpo"]) if isinstance(cfg.get("grpo"), dict) else dict(cfg)
    mode = table.pop("distributed", "auto")
    table.pop("kind", None)
    if "ref_reset_every" in table:  # the R1 report's wording for TRL's ref_model_sync_steps
        table.setdefault("ref_model_sync_steps", table.pop("ref_reset_every"))
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    try:
        config = recipe.build(GRPOConfig, recipe.flatten(table, names), source).resolved()
    except ValueError as err:
        raise ValueError(f"{source}: {err}" if source not in str(err) else str(err)) from None
    return config, mode


def main_from_config(cfg: dict, source: str = "config") -> GRPOResult:
    """`r1kit train grpo --config FILE`: load `model`, build the prompts, train, save `output_dir/final`.

    `cfg` is the parsed TOML; keys may sit at the top level or in a [grpo] table, and other tables
    only group keys for the reader (r1kit.train.config). Under torchrun each rank generates its
    share of the groups and the update runs under DDP (`distributed = "fsdp"` shards with FSDP2).
    """

    config, mode = config_from_dict(cfg, source)
    if not config.model:
        raise ValueError(f"{source}: 'model' is missing: the checkpoint folder GRPO starts from (R1-Zero: a "
                         "base model, e.g. the output of `r1kit train pretrain`; or an R1-Distill checkpoint)")
    info = dist_.setup(config.device or "auto")
    config.validate(info.world_size)
    import r1kit

    dtype = getattr(torch, config.dtype) if config.dtype else None
    model, tokenizer = r1kit.load(config.model, dtype=dtype, device=info.device)
    if tokenizer is None:
        raise ValueError(f"{config.model}: no tokenizer in the checkpoint; GRPO decodes completions to score them")
    train_model = wrap_for_update(model, info, mode)
    eval_fn = None
    if config.num_eval_samples and (config.eval_dataset or config.task):
        from r1kit.tasks import load_benchmark, make_task

        if config.eval_dataset:
            held_out = load_benchmark(config.eval_dataset, limit=config.num_eval_samples)
        else:  # a different seed than the training samples': held-out problems
            held_out = make_task(config.task, **config.task_kwargs).generate(config.num_eval_samples,
                                                                              seed=config.seed + 10_000)
        eval_fn = lambda m, step: evaluate_pass1(m, tokenizer, held_out, config)  # noqa: E731
    try:
        result = train_grpo(config, model, tokenizer, eval_fn=eval_fn, train_model=train_model)
        if config.output_dir:
            final = dist_.saveable_model(model)  # every rank joins the gather under FSDP
            if info.is_main:
                r1kit.save(final, tokenizer, Path(config.output_dir) / "final")
                print(f"grpo: saved {Path(config.output_dir) / 'final'}", file=sys.stderr)
    finally:
        dist_.cleanup()
    return result


def wrap_for_update(model, info, mode: str = "auto"):
    """The module the update runs through: the model itself, DDP, or FSDP2 (shards in place)."""
    mode = dist_.resolve_mode(mode, info)
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers=False: MoE expert-load counters are per rank (update_router_bias sums them)
        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                   broadcast_buffers=False)
    return _shard(model)


def _shard(model):
    """FSDP2 in place: each block its own unit (gathered just before it runs), the rest at the root."""
    from torch.distributed.fsdp import fully_shard

    for block in list(model.model.layers) + list(getattr(model, "mtp", [])):
        fully_shard(block)
    fully_shard(model)
    return model


def _reference_copy(model):
    """The frozen reference for the KL term: a copy of the policy. FSDP2 cannot deep-copy a sharded
    model, so there the reference is a new model sharded the same way, given the policy's shards."""
    if not dist_.is_sharded(model):
        return copy.deepcopy(model).eval().requires_grad_(False)
    from r1kit.model import Transformer

    ref = Transformer(model.config).to(next(model.parameters()).device)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}  # as the policy's (bf16 weights, fp32 buffers)
    for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
        if name in dtypes and t.dtype != dtypes[name]:
            t.data = t.data.to(dtypes[name])
    ref = _shard(ref)
    ref.load_state_dict(model.state_dict())  # shard to shard: no gather
    return ref.eval().requires_grad_(False)


def evaluate_pass1(model, tokenizer, samples: list[dict], config: GRPOConfig, verify: Callable | None = None,
                   k: int | None = None, temperature: float = 0.6, top_p: float = 0.95, prompt_fn=None,
                   seed: int = 1234, per_problem: bool = False) -> dict:
    """Held-out pass@1 as R1 reports it: mean correctness of k samples per problem at temperature 0.6,
    top-p 0.95. verify(completion, sample) -> bool; default: r1kit.rewards' accuracy reward == 1.
    per_problem: also return each problem's pass@1, to compare two models on the same problems."""
    if verify is None:
        from r1kit.rewards import accuracy_reward

        verify = lambda text, sample: accuracy_reward(text, sample) >= 1.0  # noqa: E731
    from r1kit.engine import Engine, SamplingParams

    k = k or config.eval_k
    prompt_fn = prompt_fn or prompt_fn_for(config.template, tokenizer, config.system_prompt_suffix)
    prompts = [prompt_fn(s) for s in samples]
    engine = Engine(model, tokenizer, max_batch_size=len(prompts) * k,
                    max_seq_len=max(map(len, prompts)) + config.max_completion_length + 1)
    eos = tokenizer.eos_token_id
    params = SamplingParams(n=k, max_tokens=config.max_completion_length, temperature=temperature, top_p=top_p,
                            stop_token_ids=(eos,) if eos is not None else (), seed=seed)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        gens = engine.generate(prompts, params)
    model.train(was_training)
    correct = [bool(verify(tokenizer.decode(g.token_ids, skip_special_tokens=True), samples[g.prompt_index]))
               for g in gens]
    # the standard error over problems (each problem's mean over its k samples): how far pass@1 on
    # another draw of problems like these could move; small held-out sets make it large
    problems = [0.0] * len(samples)
    for g, ok in zip(gens, correct):
        problems[g.prompt_index] += ok / k
    n = len(problems)
    mean = sum(problems) / max(1, n)
    stderr = math.sqrt(sum((x - mean) ** 2 for x in problems) / (n - 1) / n) if n > 1 else float("nan")
    out = {"pass@1": sum(correct) / max(1, len(correct)), "pass@1_stderr": stderr}
    if per_problem:
        out["per_problem"] = problems
    return out
