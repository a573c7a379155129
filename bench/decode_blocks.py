"""r1kit's C decode paths against the same engine running each block's torch code, side by side in
one process: every block of a step in one C call (cpu_kernels.decode_stack, the default), each block
its own C call (cpu_kernels.decode_block), and torch's ops.

    python bench/decode_blocks.py                      # all models, batch 1 / 16 / 64, 1 thread
    python bench/decode_blocks.py --threads 2 --batches 32

Models (random weights, float32): the tiny and 25M Qwen2 of bench/grpo_vs_trl.py and the tiny
DeepSeek-V3 preset that `r1kit quickstart` trains (MLA + MoE). Both sides use the same engine with
the same packed products (cpu_kernels.c); the only difference is how a decode step runs the blocks
(cpu_kernels.STACKED, cpu_kernels.FUSED_LAYERS). Greedy, 64 new tokens after a 16-token prompt, eos
ignored; every path must produce the same tokens. Best of --reps repetitions, the paths alternating.
The last line is JSON: tokens/s of each path and the ratios per model and batch.
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


PATHS = {"stack": (True, True), "blocks": (True, False), "torch": (False, False)}  # (FUSED_LAYERS, STACKED)


def run(engine: Engine, prompts, path: str) -> tuple[float, list[list[int]]]:
    cpu_kernels.FUSED_LAYERS, cpu_kernels.STACKED = PATHS[path]
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
            for path in PATHS:  # warm-up: packing, allocations
                run(engine, prompts, path)
            times: dict[str, list[float]] = {path: [] for path in PATHS}
            tokens = {}
            for _ in range(args.reps):
                for path in PATHS:
                    t, tokens[path] = run(engine, prompts, path)
                    times[path].append(t)
            same = tokens["stack"] == tokens["blocks"] == tokens["torch"]
            tps = {path: batch * NEW_TOKENS / min(times[path]) for path in PATHS}
            figures[f"{name}_bs{batch}"] = {**{f"{path}_tps": round(v, 1) for path, v in tps.items()},
                                            "stack_vs_torch": round(tps["stack"] / tps["torch"], 2),
                                            "stack_vs_blocks": round(tps["stack"] / tps["blocks"], 2),
                                            "blocks_vs_torch": round(tps["blocks"] / tps["torch"], 2),
                                            "same_tokens": same}
            print(f"{name:17s} batch {batch:3d}: one call {tps['stack']:8.1f}  per block {tps['blocks']:8.1f}  "
                  f"torch {tps['torch']:8.1f} tok/s -> {tps['stack'] / tps['torch']:.2f}x torch, "
                  f"{tps['stack'] / tps['blocks']:.2f}x per block   same tokens: {same}", flush=True)
            if not same:
                print("  the paths disagree: a defect (tests/test_cpu_kernels.py should catch it)")
    cpu_kernels.FUSED_LAYERS = cpu_kernels.STACKED = True
    print(json.dumps({"threads": args.threads, "new_tokens": NEW_TOKENS, "figures": figures}))
    return 0 if all(f["same_tokens"] for f in figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
