"""`r1kit info MODEL`: shapes, parameter counts and cache size of a preset or an HF folder.

Counting happens on the meta device, so the real DeepSeek-V3 (671B) is described in a second.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from r1kit.model.config import PRESETS, ModelConfig
from r1kit.model.transformer import Transformer


def describe(config: ModelConfig) -> dict:
    with torch.device("meta"):
        model = Transformer(config)
    total = model.num_parameters()
    mtp = sum(p.numel() for p in model.mtp.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and not n.startswith("mtp."))
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    active = total - mtp - routed
    if n_moe:
        per_expert = routed / (n_moe * config.n_routed_experts)
        active += n_moe * config.num_experts_per_tok * per_expert
    if config.is_mla:
        cache_numel = config.kv_lora_rank + config.qk_rope_head_dim
        mha_numel = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    else:
        cache_numel = 2 * config.kv_heads * config.attn_head_dim
        mha_numel = 2 * config.num_attention_heads * config.attn_head_dim
    return {
        "model_type": config.model_type,
        "parameters": total,
        "parameters_without_mtp": total - mtp,
        "active_parameters_per_token": int(active),
        "moe_layers": n_moe,
        "kv_cache_numel_per_token_per_layer": cache_numel,
        "kv_cache_bytes_per_token_bf16": 2 * cache_numel * config.num_hidden_layers,
        "full_mha_cache_bytes_per_token_bf16": 2 * mha_numel * config.num_hidden_layers,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"an HF model folder or a preset ({', '.join(PRESETS)})")
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args) -> int:
    if Path(args.model).exists():
        config = ModelConfig.from_file(args.model)
    else:
        config = ModelConfig.preset(args.model)
    info = describe(config)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.model}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}")
    print(f"  parameters        {info['parameters'] / 1e9:10.3f} B  (without MTP {info['parameters_without_mtp'] / 1e9:.3f} B)")
    print(f"  active per token  {info['active_parameters_per_token'] / 1e9:10.3f} B")
    print(f"  KV cache / token  {info['kv_cache_bytes_per_token_bf16'] / 1024:10.1f} KiB bf16 "
          f"(full multi-head K/V would be {info['full_mha_cache_bytes_per_token_bf16'] / 1024:.1f} KiB)")
    return 0
