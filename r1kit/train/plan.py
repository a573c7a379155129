"""`r1kit plan --config FILE`: a run's peak memory per device, estimated before launch.

Running out of memory an hour into a run is the commonest way to lose one; the arithmetic that
predicts it is short, so do it first:

    weights      parameters x bytes per parameter           (FSDP: / world size)
    gradients    parameters x bytes per gradient            (FSDP: / world size)
    optimizer    parameters x 8 (AdamW's two fp32 moments; + 4 for an fp32 master copy when the
                 weights themselves are bf16)                (FSDP: / world size)
    activations  what autograd saves per token per layer x micro-batch x sequence x layers (with
                 activation checkpointing: one hidden state per layer + one layer in full), plus the
                 output logits and their fp32 loss copies (large with a 150k vocabulary)
    KV cache     rollouts (GRPO): sequences x tokens x layers x per-token cache
                 (MLA: kv_lora_rank + qk_rope_head_dim; GQA: 2 x kv_heads x head_dim)
    reference    a frozen copy of the weights when the RL recipe has beta > 0
    overhead     CUDA context and allocator slack: 1 GiB + 5%

Parameters are counted exactly by building the model on the meta device (no memory used).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GiB = 2**30


@dataclass
class MemoryPlan:
    parameters: int
    world_size: int
    sharded: bool
    weights: float  # bytes per device
    gradients: float
    optimizer: float
    activations: float
    kv_cache: float
    reference: float
    overhead: float = 0.0

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache
                + self.reference + self.overhead)

    def rows(self) -> list[tuple[str, float]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer (AdamW)", self.optimizer),
                ("activations", self.activations), ("KV cache (rollouts)", self.kv_cache),
                ("reference model", self.reference), ("overhead", self.overhead), ("total", self.total)]


def count_parameters(config) -> int:
    import torch

    from r1kit.model import Transformer

    with torch.device("meta"):
        return Transformer(config).num_parameters()


def kv_cache_per_token(config) -> int:
    """Elements cached per token per layer."""
    if config.is_mla:
        return config.kv_lora_rank + config.qk_rope_head_dim
    return 2 * config.kv_heads * config.attn_head_dim


def activation_elements_per_token(config, layer_idx: int) -> int:
    """Elements autograd keeps per token for one decoder layer (inputs of every op's backward)."""
    h = config.hidden_size
    n = 2 * h + 2 * h  # the two RMSNorms: input and output each
    H = config.num_attention_heads
    if config.is_mla:
        qk, v = config.qk_head_dim, config.v_head_dim
        C, R = config.kv_lora_rank, config.qk_rope_head_dim
        q_lora = config.q_lora_rank or 0
        # q_a out + its norm; kv_a out, its norm, rope key; kv_b out; q and k concatenated; v; output
        n += 2 * q_lora + (C + R) + C + R + H * (config.qk_nope_head_dim + v) + 2 * H * qk + H * config.qk_rope_head_dim + 2 * H * v
    else:
        d, kv = config.attn_head_dim, config.kv_heads
        # q, k, v projections; q, k after rope; attention output
        n += 3 * H * d + 3 * kv * d
    if config.is_moe_layer(layer_idx):
        k, I = config.num_experts_per_tok, config.moe_intermediate_size
        # router logits + scores (fp32 counted as 2 elements each), k token copies, per expert SwiGLU
        n += 4 * config.n_routed_experts + k * h + k * 4 * I + k
        n += 4 * I * config.n_shared_experts
    else:
        n += 4 * config.intermediate_size  # gate and up, silu(gate), their product
    return n


def estimate(config, *, micro_batch: int, seq_len: int, world_size: int = 1, sharded: bool = False,
             gradient_checkpointing: bool = False, param_bytes: int = 4, act_bytes: int = 2,
             rollout_sequences: int = 0, rollout_len: int = 0, reference_model: bool = False,
             kv_bytes: int = 2, parameters: int | None = None) -> MemoryPlan:
    P = parameters if parameters is not None else count_parameters(config)
    shard = world_size if sharded else 1
    weights = P * param_bytes / shard
    gradients = P * param_bytes / shard
    optimizer = P * (8 + (4 if param_bytes < 4 else 0)) / shard
    tokens = micro_batch * seq_len
    layers = [activation_elements_per_token(config, i) for i in range(config.num_hidden_layers)]
    mtp = [activation_elements_per_token(config, config.num_hidden_layers + j) + 2 * config.hidden_size
           for j in range(config.num_nextn_predict_layers)]
    if gradient_checkpointing:
        per_token = config.hidden_size * (len(layers) + len(mtp)) + max(layers + mtp)
    else:
        per_token = sum(layers) + sum(mtp)
    heads = 1 + config.num_nextn_predict_layers
    # logits in the compute dtype, their fp32 copy and its gradient, per output head
    logits = heads * config.vocab_size * (act_bytes + 8)
    activations = tokens * (per_token * act_bytes + logits)
    kv = rollout_sequences * rollout_len * config.num_hidden_layers * kv_cache_per_token(config) * kv_bytes
    reference = P * 2 / shard if reference_model else 0.0
    plan = MemoryPlan(P, world_size, sharded, weights, gradients, optimizer, activations, kv, reference)
    plan.overhead = GiB + 0.05 * plan.total
    return plan


# ---------------------------------------------------------------------------- from a recipe


def device_memory(override_gb: float | None = None) -> tuple[float | None, str]:
    if override_gb:
        return override_gb * GiB, f"{override_gb:g} GiB (--device-memory)"
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return float(free), f"{torch.cuda.get_device_name()} ({free / GiB:.1f} GiB free of {total / GiB:.1f})"
    except Exception:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return float(ram), f"CPU RAM {ram / GiB:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def model_config_from(name: str, recipe_path: str):
    from r1kit.model import ModelConfig
    from r1kit.model.config import PRESETS

    if name in PRESETS:
        return ModelConfig.preset(name)
    try:
        return ModelConfig.from_file(name)  # relative paths from the working folder, as training reads them
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{recipe_path}: {err} (to plan before downloading, override with a preset: "
                                f"model={'|'.join(PRESETS)})") from None


def plan_recipe(recipe: dict, source: str, world_size: int) -> tuple[MemoryPlan, dict]:
    """Read the keys a memory plan needs from an SFT/pretrain or GRPO recipe (TRL names)."""
    from r1kit.train.config import flatten

    r = flatten(recipe, {"model_overrides"})
    name = r.get("model", "tiny")
    config = model_config_from(name, source)
    for key, value in (r.get("model_overrides") or {}).items():
        setattr(config, key, value)
    distributed = r.get("distributed", "auto")
    bf16 = r.get("bf16", "auto")
    rollout_len = int(r.get("max_prompt_length", 0) or 0) + int(r.get("max_completion_length", 0) or 0)
    seq_len = int(r.get("max_length", 0) or rollout_len or 512)
    low = (r.get("param_dtype") or r.get("dtype")) in ("bfloat16", "bf16", "float16", "fp16")
    if "num_generations" in r and "batch_size" in r:  # r1kit's GRPO recipe (r1kit.train.grpo.GRPOConfig)
        rollouts = int(r["batch_size"]) // world_size  # each rank generates its share of a step at once
        micro = int(r.get("micro_batch_size") or rollouts // int(r.get("num_minibatches", 1)))
        act_bytes = 2 if low else 4  # it computes in the weights' dtype (no autocast)
    else:  # SFT / pretrain, and TRL's names
        micro = int(r.get("per_device_train_batch_size", 8))
        rollouts = 0
        if rollout_len:
            rollouts = int(r.get("generation_batch_size", 0) or micro * int(r.get("num_generations", 1)))
        act_bytes = 4 if bf16 is False else 2
    inputs = dict(micro_batch=micro, seq_len=seq_len, world_size=world_size, sharded=distributed == "fsdp",
                  gradient_checkpointing=bool(r.get("gradient_checkpointing", False)),
                  param_bytes=2 if low else 4, act_bytes=act_bytes, rollout_sequences=rollouts,
                  rollout_len=rollout_len, reference_model=float(r.get("beta", 0) or 0) > 0)
    return estimate(config, **inputs), {"model": name, **inputs}


def format_plan(plan: MemoryPlan, inputs: dict, capacity: float | None, where: str) -> str:
    lines = [f"model {inputs['model']}: {plan.parameters / 1e9:.3f}B parameters; micro-batch "
             f"{inputs['micro_batch']} x {inputs['seq_len']} tokens; world size {plan.world_size}"
             f"{' (FSDP: states sharded)' if plan.sharded else ' (replicated)'}"
             f"{'; activation checkpointing' if inputs['gradient_checkpointing'] else ''}",
             "per device:"]
    for name, value in plan.rows():
        lines.append(f"  {name:<22}{value / GiB:>12.2f} GiB")
    if capacity is not None:
        lines.append(f"device memory: {where}")
        verdict = "fits" if plan.total <= capacity else "DOES NOT FIT"
        lines.append(f"{verdict}: {plan.total / GiB:.2f} GiB needed, {capacity / GiB:.2f} GiB available")
        if plan.total > capacity:
            hints = []
            if not plan.sharded:
                hints.append("distributed=fsdp with more GPUs (shards weights, gradients and optimizer)")
            if not inputs["gradient_checkpointing"]:
                hints.append("gradient_checkpointing=true")
            hints.append("a smaller per_device_train_batch_size or max_length")
            lines.append("try: " + "; ".join(hints))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="a training recipe (recipes/*.toml)")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="number of processes (GPUs) the run will use, e.g. 16 for 2 nodes x 8")
    parser.add_argument("--device-memory", type=float, default=None, metavar="GB",
                        help="memory per device in GiB (default: this GPU's free memory, else RAM)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def main(args: argparse.Namespace) -> int:
    from r1kit.train.config import parse_overrides, read_toml

    recipe = {**read_toml(args.config), **parse_overrides(args.overrides)}
    plan, inputs = plan_recipe(recipe, args.config, args.world_size)
    capacity, where = device_memory(args.device_memory)
    if args.json:
        print(json.dumps({**asdict(plan), "total": plan.total, "capacity": capacity, "inputs": inputs}))
    else:
        print(format_plan(plan, inputs, capacity, where))
    if capacity is not None and plan.total > capacity:
        print(f"r1kit plan: the run needs {plan.total / GiB:.1f} GiB per device but {capacity / GiB:.1f} GiB is "
              "available; not launching it", file=sys.stderr)
        return 1
    return 0
