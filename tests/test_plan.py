"""`r1kit plan` against a hand calculation, for the real DeepSeek-V3 and R1-Distill-Qwen-7B shapes."""
from __future__ import annotations

from pathlib import Path

import torch

from r1kit.cli import main as cli_main
from r1kit.model import ModelConfig, Transformer
from r1kit.train.plan import GiB, estimate

# ---------------------------------------------------------------------------- hand calculations


def hand_params_deepseek_v3() -> int:
    """DeepSeek-V3 from its config.json numbers (R1_FACTS.md), term by term."""
    V, h, L, H = 129_280, 7_168, 61, 128
    q_lora, C, R, nope, v = 1_536, 512, 64, 128, 128
    I, moe_I, E, dense_layers = 18_432, 2_048, 256, 3
    attention = (h * q_lora + q_lora                   # q_a_proj + q_a_layernorm
                 + q_lora * H * (nope + R)             # q_b_proj
                 + h * (C + R) + C                     # kv_a_proj_with_mqa + kv_a_layernorm
                 + C * H * (nope + v)                  # kv_b_proj
                 + H * v * h)                          # o_proj
    dense_mlp = 3 * h * I
    moe = E * 3 * h * moe_I + 3 * h * moe_I + E * h    # routed + 1 shared expert + router
    norms = 2 * h
    mtp = attention + moe + norms + 3 * h + 2 * h * h  # enorm, hnorm, shared_head.norm; eh_proj
    return (2 * V * h + h                              # embedding, lm_head, final norm
            + L * (attention + norms) + dense_layers * dense_mlp + (L - dense_layers) * moe + mtp)


def hand_params_qwen_7b() -> int:
    V, h, L, H, kv, d, I = 152_064, 3_584, 28, 28, 4, 128, 18_944
    attention = h * H * d + H * d + 2 * (h * kv * d + kv * d) + H * d * h  # q,k,v with biases; o without
    return 2 * V * h + h + L * (attention + 3 * h * I + 2 * h)


def test_parameter_counts_match_the_hand_calculation():
    for name, hand in (("deepseek-v3", hand_params_deepseek_v3()), ("r1-distill-qwen-7b", hand_params_qwen_7b())):
        with torch.device("meta"):
            counted = Transformer(ModelConfig.preset(name)).num_parameters()
        assert counted == hand, (name, counted, hand)
    # and the published sizes: 671B + 14B MTP (whose 1.85B embedding/head copies r1kit shares)
    assert abs(hand_params_deepseek_v3() + 2 * 129_280 * 7_168 - 685e9) / 685e9 < 0.005
    assert abs(hand_params_qwen_7b() - 7.62e9) / 7.62e9 < 0.005


def test_plan_r1_distill_qwen_7b_sft_within_10_percent():
    # SFT on 8 GPUs with FSDP, micro-batch 1 x 4096 tokens, activation checkpointing, bf16 autocast
    config = ModelConfig.preset("r1-distill-qwen-7b")
    plan = estimate(config, micro_batch=1, seq_len=4096, world_size=8, sharded=True, gradient_checkpointing=True)
    P = hand_params_qwen_7b()
    states = P * (4 + 4 + 8) / 8  # fp32 weights, fp32 grads, AdamW m and v in fp32, sharded 8 ways
    # checkpointing keeps one bf16 hidden state per layer; the logits (bf16 + fp32 copy + fp32 grad
    # = 10 bytes per vocabulary entry) dominate; one layer is recomputed in full at a time
    tokens = 4096
    hidden = tokens * 28 * 3584 * 2
    logits = tokens * 152_064 * 10
    one_layer = tokens * (8 * 3584 + 3 * 28 * 128 + 3 * 4 * 128 + 4 * 18_944) * 2
    hand = states + hidden + logits + one_layer
    hand += 1 * GiB + 0.05 * hand  # CUDA context + allocator slack
    print(f"qwen-7b fsdp8: plan {plan.total / GiB:.2f} GiB, hand {hand / GiB:.2f} GiB "
          f"(states {states / GiB:.2f}, logits {logits / GiB:.2f})")
    assert abs(plan.total - hand) / hand < 0.10
    assert abs(plan.weights + plan.gradients + plan.optimizer - states) / states < 0.01
    # 16 bytes/parameter unsharded: ~114 GiB, more than one 80 GB GPU before any activation
    single = estimate(config, micro_batch=1, seq_len=4096, gradient_checkpointing=True)
    assert single.weights + single.gradients + single.optimizer > 110 * GiB


def test_plan_deepseek_v3_rollouts_within_10_percent():
    # GRPO-style: 256 GPUs, FSDP, checkpointing, 16 rollouts of 8192 tokens cached per device
    config = ModelConfig.preset("deepseek-v3")
    plan = estimate(config, micro_batch=1, seq_len=8192, world_size=256, sharded=True, gradient_checkpointing=True,
                    rollout_sequences=16, rollout_len=8192, reference_model=False)
    P = hand_params_deepseek_v3()
    states = P * 16 / 256
    kv = 16 * 8192 * 61 * (512 + 64) * 2  # MLA latent + rope key per token per layer, bf16
    assert plan.kv_cache == kv
    tokens = 8192
    hidden = tokens * 62 * 7168 * 2  # 61 layers + the MTP layer
    logits = tokens * 2 * 129_280 * 10  # main head + MTP head
    hand = states + kv + hidden + logits
    hand += 1 * GiB + 0.05 * hand
    print(f"deepseek-v3 fsdp256: plan {plan.total / GiB:.2f} GiB, hand {hand / GiB:.2f} GiB "
          f"(states {states / GiB:.2f}, kv {kv / GiB:.2f})")
    assert abs(plan.total - hand) / hand < 0.10
    # the MLA cache is 576 numbers per token per layer, against 2 x 128 x 128 for full MHA
    assert kv * (2 * 128 * 128) / 576 > 50 * kv


def test_plan_cli_stops_when_it_will_not_fit(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "r1-distill-qwen-7b"\nmax_length = 4096\nper_device_train_batch_size = 1\n'
                      'gradient_checkpointing = true\n')
    assert cli_main(["plan", "--config", str(recipe), "--device-memory", "80"]) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "distributed=fsdp" in captured.out and "not launching" in captured.err
    assert cli_main(["plan", "--config", str(recipe), "--device-memory", "80", "--world-size", "8",
                     "distributed=fsdp"]) == 0
    assert "fits" in capsys.readouterr().out


def test_plan_reads_r1kits_grpo_recipe():
    """The GPU GRPO recipe in r1kit's own names: bf16 weights and gradients, AdamW's float32 moments
    plus its float32 master weights, each rank's share of the step's completions in the KV cache at
    once, its micro-batch for the update, and the reference model (beta > 0)."""
    from r1kit.train.config import read_toml
    from r1kit.train.plan import count_parameters, kv_cache_per_token, plan_recipe

    recipe = read_toml(Path(__file__).resolve().parent.parent / "recipes" / "grpo-gsm8k-r1-distill-qwen-1.5b.toml")
    recipe["model"] = "r1-distill-qwen-1.5b"
    plan, inputs = plan_recipe(recipe, "grpo.toml", world_size=2)
    config = ModelConfig.preset("r1-distill-qwen-1.5b")
    P = count_parameters(config)
    assert plan.weights == plan.gradients == 2 * P and plan.optimizer == 12 * P
    assert inputs["rollout_sequences"] == 256 // 2 and inputs["micro_batch"] == 8 and inputs["act_bytes"] == 2
    assert plan.kv_cache == 128 * 2048 * config.num_hidden_layers * kv_cache_per_token(config) * 2
    assert plan.reference == 2 * P
