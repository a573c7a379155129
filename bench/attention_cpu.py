"""Training's causal attention on a CPU: r1kit's kernel (r1kit/model/cpu_attention.py) against SDPA
as attention.py called it before (MLA: query and key parts concatenated, V padded to the query's
width for the flash kernel; GQA: enable_gqa), forward + backward, float32, same inputs, alternating
rounds in one process.

    python bench/attention_cpu.py [--threads 2 --rounds 5]

Shapes: the tiny DeepSeek-V3 of bench/train_step.py (MLA, q 32 + 16, v 32), the GRPO bench's tiny and
25M Qwen2 updates (GQA, head 64), and longer sequences up to cpu_attention.MAX_LEN.
Last line: a JSON object of the speedups (SDPA time / r1kit time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from r1kit.allocator import keep_freed_memory
from r1kit.model.cpu_attention import causal_attention

SHAPES = {  # name: (kind, B, T, H, G, d, dv, d_rope)
    "mla_train_step_8x96": ("mla", 8, 96, 4, 4, 32, 32, 16),
    "mla_8x256": ("mla", 8, 256, 4, 4, 32, 32, 16),
    "mla_2x1024": ("mla", 2, 1024, 4, 4, 32, 32, 16),
    "gqa_grpo_tiny_32x72": ("gqa", 32, 72, 4, 2, 64, 64, 0),
    "gqa_grpo_25m_32x72": ("gqa", 32, 72, 8, 4, 64, 64, 0),
    "gqa_8x256_d128": ("gqa", 8, 256, 4, 2, 128, 128, 0),
    "gqa_2x1024_d128": ("gqa", 2, 1024, 4, 2, 128, 128, 0),
}


def sdpa_mla(q_nope, q_rope, k_nope, k_rope, v, scale):
    q = torch.cat((q_nope, q_rope), -1)
    k = torch.cat((k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)), -1)
    vp = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), vp.transpose(1, 2), is_causal=True,
                                         scale=scale)
    return out.transpose(1, 2)[..., : v.shape[-1]]


def sdpa_gqa(q, k, v, scale):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def inputs(kind, B, T, H, G, d, dv, dr):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    if kind == "mla":
        return [r(B, T, H, d), r(B, T, H, dr), r(B, T, H, d), r(B, T, 1, dr), r(B, T, H, dv)]
    return [r(B, T, H, d), r(B, T, G, d), r(B, T, G, dv)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as r1kit's trainers run
    print(f"torch {torch.__version__}, {args.threads} threads, forward + backward, float32")
    figures = {}
    for name, (kind, B, T, H, G, d, dv, dr) in SHAPES.items():
        xs = inputs(kind, B, T, H, G, d, dv, dr)
        scale = (d + dr) ** -0.5
        if kind == "mla":
            q_nope, q_rope, k_nope, k_rope, v = xs
            sides = {"sdpa": lambda: sdpa_mla(q_nope, q_rope, k_nope, k_rope, v, scale),
                     "r1kit": lambda: causal_attention(q_nope, k_nope, v, scale, q2=q_rope, k2=k_rope)}
        else:
            q, k, v = xs
            sides = {"sdpa": lambda: sdpa_gqa(q, k, v, scale), "r1kit": lambda: causal_attention(q, k, v, scale)}
        dy = torch.randn(B, T, H, dv, generator=torch.Generator().manual_seed(1))
        outs = {}
        for side, fn in sides.items():  # warm-up, and the same values both ways
            out = fn()
            outs[side] = (out.detach(), torch.autograd.grad(out, xs, dy))
        diff = max([(outs["sdpa"][0] - outs["r1kit"][0]).abs().max().item()]
                   + [(a - b).abs().max().item() for a, b in zip(outs["sdpa"][1], outs["r1kit"][1])])
        times = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side, fn in sides.items():
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    torch.autograd.grad(fn(), xs, dy)
                times[side].append((time.perf_counter() - t0) / args.iters)
        ms = {side: statistics.median(t) * 1e3 for side, t in times.items()}
        figures[name] = round(ms["sdpa"] / ms["r1kit"], 3)
        print(f"{name:24s} B {B:2d} T {T:4d} heads {H}/{G} d {d}+{dr} v {dv}: SDPA {ms['sdpa']:7.2f} ms, "
              f"r1kit {ms['r1kit']:7.2f} ms: {figures[name]:.2f}x   (max diff {diff:.1e})")
    print(json.dumps({"threads": args.threads, "speedup": figures}))


if __name__ == "__main__":
    main()
