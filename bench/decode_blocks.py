"""r1kit's C decode blocks (cpu_kernels.decode_block) against the same engine running each block's
torch code, side by side in one process.

    python bench/decode_blocks.py                      # all models, batch 1 / 16 / 64, 1 thread
    python bench/decode_blocks.py --threads 2 --batches 32

Models (random weights, float32): the tiny and 25M Qwen2 of bench/grpo_vs_trl.py and the tiny
DeepSeek-V3 preset that `r1kit quickstart` trains (MLA + MoE). Both sides use the same engine with
the same packed products (cpu_kernels.c); the only difference is whether a decode step runs each
block through the C calls or through torch's ops (cpu_kernels.FUSED_LAYERS). Greedy, 64 new
tokens after a 16-token prompt, eos ignored; the two sides must produce the same tokens. Best of
--reps repetitions, the sides alternating. The last line is JSON: tokens/s of both sides and their
ratio per model and batch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from r1kit.engine import Engine, SamplingParams  # noqa: E402
from r1kit.model import ModelConfig, Transformer, cpu_kernels  # noqa: E402

MODELS = {
    "qwen2-tiny": lambda: ModelConfig(model_type="qwen2", vocab_size=512, hidden_size=256, intermediate_size=768,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True),
    "qwen2-25m": lambda: ModelConfig(model_type="qwen2", vocab_size=512, hidden_size=512, intermediate_size=1536,
                                     num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                     tie_word_embeddings=True),
    "deepseek-v3-tiny": lambda: ModelConfig.preset("tiny", vocab_size=512),
}
PROMPT_LEN, NEW_TOKENS = 16, 64


def run(engine: Engine, prompts, fused: bool) -> tuple[float, list[list[int]]]:
    cpu_kernels.FUSED_LAYERS = fused
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    return time.perf_counter() - start, [g.token_ids for g in out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if cpu_kernels.library() is None:
        print("the C kernels cannot run here (no x86 AVX2 CPU or no C compiler): nothing to compare")
        return 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), greedy, prompt {PROMPT_LEN} + {NEW_TOKENS} new tokens, "
          f"best of {args.reps} alternating repetitions", flush=True)
    figures: dict[str, dict] = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = Transformer(MODELS[name]()).eval()
        batches = [int(b) for b in args.batches.split(",")]
        engine = Engine(model, max_batch_size=max(batches), max_seq_len=PROMPT_LEN + NEW_TOKENS + 1)
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, 500, (batch, PROMPT_LEN), generator=g).tolist()
            run(engine, prompts, True), run(engine, prompts, False)  # warm-up: packing, allocations
            times = {True: [], False: []}
            tokens = {}
            for _ in range(args.reps):
                for fused in (True, False):
                    t, tokens[fused] = run(engine, prompts, fused)
                    times[fused].append(t)
            same = tokens[True] == tokens[False]
            c, t = batch * NEW_TOKENS / min(times[True]), batch * NEW_TOKENS / min(times[False])
            figures[f"{name}_bs{batch}"] = {"c_blocks_tps": round(c, 1), "torch_blocks_tps": round(t, 1),
                                            "speedup": round(c / t, 2), "same_tokens": same}
            print(f"{name:17s} batch {batch:3d}: C blocks {c:8.1f} tok/s   torch blocks {t:8.1f} tok/s   "
                  f"-> {c / t:.2f}x   same tokens: {same}", flush=True)
            if not same:
                print("  the two paths disagree: a defect (tests/test_cpu_kernels.py should catch it)")
    cpu_kernels.FUSED_LAYERS = True
    print(json.dumps({"threads": args.threads, "new_tokens": NEW_TOKENS, "figures": figures}))
    return 0 if all(f["same_tokens"] for f in figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
