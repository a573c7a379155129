"""Training-step throughput: r1kit's model vs transformers' own, same configs, same weights.

One step = forward + backward + fused AdamW (both sides) on a (batch, seq) block of random tokens.
r1kit runs eagerly and with its forward under torch.compile (SFTConfig.compile; compile time printed,
not timed); the sides are timed in alternating rounds in one process (this machine is noisy; only
the ratio means much). On a CPU with AMX (or with --mixed) both also run in mixed precision with
float32 weights, each library's own way: r1kit's bf16 products (r1kit/model/precision.py, what its SFT
runs there by default) and transformers under torch.autocast (its Trainer's bf16=True on a CPU).

    HF_HUB_OFFLINE=1 python bench/train_step.py [--batch 8 --seq 128 --rounds 5 --steps 3]
    HF_HUB_OFFLINE=1 python bench/train_step.py --device cuda --dtype bfloat16 --batch 32 --seq 512
    HF_HUB_OFFLINE=1 python bench/train_step.py --compile-transformers   # also transformers compiled

On a GPU both sides hold their weights in the given dtype (pure bf16, as a speed check; r1kit's
trainers keep float32 master weights under bf16 autocast).

Last line: a JSON object with deepseek_v3_speedup and qwen2_speedup (ours / transformers), and the
same with `_compiled`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402

import r1kit  # noqa: E402
from r1kit.model import precision  # noqa: E402

transformers.logging.set_verbosity_error()


def configs():
    # the shapes of r1kit's `tiny` presets: what the embedded default trains on this CPU
    ds = transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=2, first_k_dense_replace=1, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=512,
        num_nextn_predict_layers=0)
    qwen = transformers.Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    return {"deepseek_v3": (transformers.DeepseekV3ForCausalLM, ds), "qwen2": (transformers.Qwen2ForCausalLM, qwen)}


def make_step(model, is_hf: bool, compiled: bool = False, mixed: bool = False):
    # fused AdamW on both sides: transformers' Trainer default (`adamw_torch_fused`) and r1kit's trainers'
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if is_hf:  # compiled as Trainer's `torch_compile=True` does: the model's forward and its loss
        loss_fn = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss) if compiled else None
    else:
        loss_fn = torch.compile(lambda ids: model.loss(ids)["loss"]) if compiled else None

    def context():
        if not mixed:
            return contextlib.nullcontext()
        if is_hf:  # transformers' Trainer with bf16=True on a CPU: autocast
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return precision.bf16_matmuls()  # r1kit's SFT with bf16="auto" on an AMX CPU

    def step(ids):
        with context():
            if is_hf:
                loss = loss_fn(ids) if compiled else model(input_ids=ids, labels=ids).loss
            elif compiled:
                loss = loss_fn(ids)
            else:
                loss = model.loss(ids)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not is_hf:
            model.update_router_bias()
        return loss.item()

    return step


def bench(name, cls, cfg, args):
    torch.manual_seed(0)
    hf_model = cls(cfg).train()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        ours, _ = r1kit.load(tmp, dtype=dtype, device=args.device)
        ours_c, _ = r1kit.load(tmp, dtype=dtype, device=args.device)  # the compiled side: same start, own optimizer
        ours_m = r1kit.load(tmp, dtype=dtype, device=args.device)[0] if args.mixed else None  # the mixed side
    hf_model.to(device=args.device, dtype=dtype)
    ours.train()
    ours_c.train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    with torch.no_grad():  # same weights, same function
        diff = (ours(ids) - hf_model(ids).logits).abs().max().item()
    steps = {"r1kit": make_step(ours, False), "r1kit_compiled": make_step(ours_c, False, compiled=True),
             "transformers": make_step(hf_model, True)}
    if args.mixed:  # mixed precision, float32 weights: each library's own way (see --mixed), own copies
        hf_m = cls(cfg).train()
        hf_m.load_state_dict(hf_model.state_dict())
        steps["r1kit_mixed"] = make_step(ours_m.train(), False, mixed=True)
        steps["transformers_mixed"] = make_step(hf_m.to(device=args.device, dtype=dtype), True, mixed=True)
    if args.compile_transformers:  # its own copy of the same weights, compiled as r1kit's is
        hf_c = cls(cfg).train()
        hf_c.load_state_dict(hf_model.state_dict())
        steps["transformers_compiled"] = make_step(hf_c.to(device=args.device, dtype=dtype), True, compiled=True)
    for side, fn in steps.items():  # warm-up (the compiled side compiles here, untimed)
        t0 = time.perf_counter()
        fn(ids)
        if side == "r1kit_compiled":
            compile_s = time.perf_counter() - t0
        if side == "transformers_compiled":
            compile_hf_s = time.perf_counter() - t0
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for side, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn(ids)
            times[side].append((time.perf_counter() - t0) / args.steps)
    tokens = args.batch * args.seq
    tps = {side: tokens / statistics.median(ts) for side, ts in times.items()}
    speedup = tps["r1kit"] / tps["transformers"]
    compiled = tps["r1kit_compiled"] / tps["transformers"]
    print(f"{name:12s} r1kit {tps['r1kit']:9.0f} tok/s, compiled {tps['r1kit_compiled']:9.0f} tok/s "
          f"({compile_s:.0f} s to compile)   transformers {tps['transformers']:9.0f} tok/s   "
          f"speedup {speedup:.2f}x eager, {compiled:.2f}x compiled   (initial logits max diff {diff:.1e})")
    if "r1kit_mixed" in tps:
        print(f"{'':12s} mixed precision (bf16 products): r1kit {tps['r1kit_mixed']:9.0f} tok/s, transformers under "
              f"autocast {tps['transformers_mixed']:9.0f} tok/s: {tps['r1kit_mixed'] / tps['transformers_mixed']:.2f}x; "
              f"r1kit mixed / transformers float32 {tps['r1kit_mixed'] / tps['transformers']:.2f}x")
    if "transformers_compiled" in tps:
        print(f"{'':12s} transformers compiled {tps['transformers_compiled']:9.0f} tok/s ({compile_hf_s:.0f} s to compile): "
              f"r1kit compiled / transformers compiled {tps['r1kit_compiled'] / tps['transformers_compiled']:.2f}x")
    return tps, speedup, compiled


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides on it)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=None,
                        help="also time both in mixed precision, float32 weights: r1kit's bf16 products "
                             "(r1kit.model.precision; SFT's bf16='auto' on an AMX CPU) and transformers under "
                             "torch.autocast (Trainer's bf16=True on a CPU). Default: on a CPU with AMX")
    parser.add_argument("--compile-transformers", action="store_true",
                        help="also time transformers' model under torch.compile (Trainer's torch_compile=True)")
    args = parser.parse_args()
    if args.mixed is None:
        args.mixed = args.device == "cpu" and args.dtype == "float32" and precision.fast_bf16_cpu()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"threads {torch.get_num_threads()}"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {where}, {args.dtype}, "
          f"batch {args.batch} x seq {args.seq}, fwd+bwd+AdamW")
    figures = {"device": args.device, "dtype": args.dtype, "batch": args.batch, "seq": args.seq}
    for name, (cls, cfg) in configs().items():
        tps, speedup, compiled = bench(name, cls, cfg, args)
        figures[f"{name}_speedup"] = round(speedup, 3)
        figures[f"{name}_speedup_compiled"] = round(compiled, 3)
        figures[f"{name}_r1kit_compiled_tokens_per_s"] = round(tps["r1kit_compiled"], 1)
        figures[f"{name}_r1kit_tokens_per_s"] = round(tps["r1kit"], 1)
        figures[f"{name}_transformers_tokens_per_s"] = round(tps["transformers"], 1)
        if "r1kit_mixed" in tps:
            figures[f"{name}_speedup_mixed"] = round(tps["r1kit_mixed"] / tps["transformers_mixed"], 3)
            figures[f"{name}_r1kit_mixed_tokens_per_s"] = round(tps["r1kit_mixed"], 1)
            figures[f"{name}_transformers_mixed_tokens_per_s"] = round(tps["transformers_mixed"], 1)
        if "transformers_compiled" in tps:
            figures[f"{name}_speedup_both_compiled"] = round(tps["r1kit_compiled"] / tps["transformers_compiled"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
