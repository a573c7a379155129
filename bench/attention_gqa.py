"""Training attention with fewer KV heads than query heads: SDPA's own grouping (`enable_gqa=True`,
what r1kit.model.attention.attend runs) against keys and values expanded to every query head first
(`repeat_interleave`, what it ran before), forward and backward, on the shapes r1kit's CPU training
sees: the tiny and 25M Qwen2 models' GRPO buckets and shared prompts, and a train-step block; causal,
and with padding masks as GRPO's buckets carry. Both sides in alternating rounds in one process;
outputs checked equal.

    python bench/attention_gqa.py [--threads 1 --rounds 7]

Last line: JSON with the speedup (expanded time / grouped time) per case.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

# (batch, query heads, kv heads, new tokens, keys, head dim)
CASES = {
    "train_step_tiny": (8, 4, 2, 96, 96, 32),
    "grpo_bucket_tiny": (32, 4, 2, 40, 48, 64),
    "grpo_bucket_25m": (24, 8, 4, 40, 48, 64),
    "grpo_prompts_25m": (4, 8, 4, 8, 8, 64),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); forward + backward, median of {args.rounds} rounds")
    out = {}
    for name, (B, H, Hkv, T, S, D) in CASES.items():
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
        k = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
        v = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
        dy = torch.randn(B, H, T, D, generator=g)
        # causal: new tokens at the end of the keys (a bucket continuing its prompts' cache: an explicit
        # mask, aligned bottom-right; without a cache, SDPA's is_causal); padded: half the rows end early
        tril = torch.ones(T, S, dtype=torch.bool).tril(S - T).expand(B, 1, T, S)
        padded = tril.clone()
        padded[: B // 2, :, :, S - S // 8:] = False
        for kind, m in (("causal", None if S == T else tril), ("padded", padded)):
            causal = m is None

            def expanded(m=m, causal=causal):
                rep = H // Hkv
                return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                      attn_mask=m, is_causal=causal)

            def grouped(m=m, causal=causal):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)

            with torch.no_grad():
                diff = (expanded() - grouped()).abs().max().item()
            sides = {"expanded": expanded, "grouped": grouped}
            times = {s: [] for s in sides}
            for fn in sides.values():
                fn().backward(dy)
            for _ in range(args.rounds):
                for s, fn in sides.items():
                    t = time.perf_counter()
                    for _ in range(args.reps):
                        fn().backward(dy)
                    times[s].append((time.perf_counter() - t) / args.reps)
            med = {s: statistics.median(ts) for s, ts in times.items()}
            speedup = med["expanded"] / med["grouped"]
            out[f"{name}_{kind}"] = round(speedup, 3)
            print(f"{name:18s} {kind:6s} B={B} H={H}/{Hkv} T={T} S={S} D={D}: "
                  f"expanded {med['expanded'] * 1e3:7.3f} ms, "
                  f"grouped {med['grouped'] * 1e3:7.3f} ms -> {speedup:.2f}x   (outputs max diff {diff:.1e})")
    print(json.dumps({"threads": args.threads, "speedup": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
