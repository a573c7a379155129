"""r1kit's small-batch CPU products (r1kit/model/cpu_kernels.c) against torch's (MKL), side by side.

    python bench/decode_gemm.py                  # 1 and 2 threads
    python bench/decode_gemm.py --threads 1

1. Products alone: every weight matrix of a model's decode step (the engine's fused, transposed
   layout for torch; the packed copy for r1kit), one after another, at 1-64 rows: the 25M Qwen2 of
   bench/grpo_vs_trl.py (8 layers, hidden 512), and two layers shaped like R1-Distill-Qwen-1.5B
   (hidden 1536, MLP 8960). Best of several repeats, interleaved.
2. Packing: the time to pack a model's weights again after they changed (an optimizer step), into
   the buffers already allocated -- paid once per GRPO generation.
3. A whole decode step of the 25M model (random weights, 30 cached tokens) at 1, 6 and 32 rows, with
   and without the kernels, interleaved.
The last line is JSON: the speedups (torch time / r1kit time) per model, threads and rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from r1kit.model import ModelConfig, Transformer, cpu_kernels  # noqa: E402
from r1kit.model.fuse import prepare_for_decode  # noqa: E402

MODELS = {
    "25m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=262),
    "qwen1.5b_2layers": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=2, num_attention_heads=12,
                             num_key_value_heads=2, vocab_size=4096),
}


def best(fn, repeats: int = 5, seconds: float = 0.1) -> float:
    fn()
    n, t = 1, time.perf_counter()
    fn()
    while time.perf_counter() - t < seconds / 4:
        n *= 2
        t = time.perf_counter()
        for _ in range(n):
            fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return min(times)


def decode_weights(model) -> list[tuple[torch.Tensor, torch.Tensor | None, cpu_kernels.PackedWeight]]:
    """(weight (out, in) as the engine stores it, bias, its PackedWeight) for every product of a step."""
    out = []
    for module in model.modules():
        fused = getattr(module, "fused", None)
        if fused is not None:
            out.append((fused.weight, fused.bias, fused.packed))
        for name in ("o_proj", "down_proj"):
            layer = getattr(module, name, None)
            if isinstance(layer, torch.nn.Linear):
                out.append((layer.weight, layer.bias, layer.packed_weight))
    out.append((model.model.embed_tokens.weight, None, model.head_packed) if model.lm_head is None
               else (model.lm_head.weight, None, model.lm_head.packed_weight))
    return out


def build(name: str):
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", tie_word_embeddings=name == "25m", max_position_embeddings=256, **MODELS[name])
    model = Transformer(cfg).eval()
    prepare_for_decode(model)
    cpu_kernels.attach(model)
    return model


def products(model, rows_list, figures: dict, label: str) -> None:
    weights = decode_weights(model)
    with torch.inference_mode():
        for rows in rows_list:
            xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w, _, _ in weights}
            ref = lambda: [torch.nn.functional.linear(xs[w.shape[1]], w, b) for w, b, _ in weights]  # noqa: E731
            ours = lambda: [p(xs[w.shape[1]], w, b) for w, b, p in weights]  # noqa: E731
            err = max(float((a - b).abs().max()) for a, b in zip(ref(), ours()))
            assert err < 1e-3, err
            t_ref, t_ours = [], []
            for _ in range(3):  # interleaved
                t_ref.append(best(ref))
                t_ours.append(best(ours))
            a, b = min(t_ref), min(t_ours)
            flops = 2 * rows * sum(w.numel() for w, _, _ in weights)
            figures[f"{label}_rows{rows}"] = round(a / b, 2)
            print(f"  {rows:3d} rows: torch {1000 * a:7.2f} ms  r1kit {1000 * b:7.2f} ms  -> {a / b:.2f}x "
                  f"(r1kit {flops / b / 1e9:.1f} GFLOP/s)", flush=True)


def repack_ms(model) -> float:
    weights = decode_weights(model)
    x = {w.shape[1]: torch.randn(2, w.shape[1]) for w, _, _ in weights}
    with torch.inference_mode():
        for w, b, p in weights:
            p(x[w.shape[1]], w, b)  # allocate and pack once
    t = time.perf_counter()
    for w, b, p in weights:
        p.key = None  # as if the weights had changed
        p._packed(w)
    return 1000 * (time.perf_counter() - t)


def decode_steps(model, figures: dict, label: str) -> None:
    lib = cpu_kernels.library()
    for B in (1, 6, 32):
        ctx = 30
        cache = model.new_cache(B, 64)
        with torch.inference_mode():
            ids = torch.randint(0, 200, (B, ctx))
            model(ids, positions=torch.arange(ctx).expand(B, ctx), cache=cache, kv_len=ctx)
            x, pos = torch.randint(0, 200, (B, 1)), torch.full((B, 1), ctx)
            step = lambda: model(x, positions=pos, cache=cache, kv_len=ctx + 1)  # noqa: E731
            t = {"torch": [], "r1kit": []}
            for _ in range(5):
                for k in t:
                    cpu_kernels._LIB = lib if k == "r1kit" else None
                    t[k].append(best(step, repeats=3))
            cpu_kernels._LIB = lib
        a, b = statistics.median(t["torch"]), statistics.median(t["r1kit"])
        figures[f"{label}_step_rows{B}"] = round(a / b, 2)
        print(f"  decode step, {B:2d} rows: torch {1000 * a:6.2f} ms  r1kit {1000 * b:6.2f} ms  -> {a / b:.2f}x", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    args = ap.parse_args()
    if cpu_kernels.library() is None:
        print("r1kit's CPU kernels are not available here (needs x86 with AVX2 and a C compiler)")
        print(json.dumps({"available": False}))
        return 0
    rows_list = [int(r) for r in args.rows.split(",")]
    figures: dict = {"available": True}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in MODELS:
            model = build(name)
            n = sum(w.numel() for w, _, _ in decode_weights(model))
            print(f"[{name}, {threads} thread(s)] the products of one decode step ({n / 1e6:.1f}M weights):", flush=True)
            products(model, rows_list, figures, f"{name}_t{threads}")
            ms = repack_ms(model)
            figures[f"{name}_t{threads}_repack_ms"] = round(ms, 1)
            print(f"  packing them again after a weight update: {ms:.1f} ms", flush=True)
            if name == "25m":
                decode_steps(model, figures, f"{name}_t{threads}")
            del model
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
