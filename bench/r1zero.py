"""R1-Zero in miniature: does GRPO alone, from a base model, raise held-out pass@1 on countdown?

    python bench/r1zero.py                       # pretrain a base (~4 min), run the recipe, measure
    python bench/r1zero.py --save-base runs/base-countdown   # also keep the base for `r1kit train grpo`

1. Base: a 0.8M-parameter char-level Qwen2-layout model (or, --base tiny, the DeepSeek-V3 miniature) pretrained on countdown worked solutions
   in the R1-Zero format, `<think> steps </think> <answer> expression </answer>`. Half are written
   by a "sloppy" solver that always just adds the numbers (never right): a systematic wrong mode
   that survives sampling at temperature 0.6 (DESIGN.md, "What makes the miniature R1-Zero work").
2. Held-out pass@1 (problems of another seed, k samples at temperature 0.6, top-p 0.95).
3. recipes/r1zero-countdown.toml, unchanged except the model, run in-process with train_grpo.
4. Held-out pass@1 again. Last line: JSON with the minutes and the points gained.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1kit.model import ModelConfig, Transformer  # noqa: E402
from r1kit.tasks import make_task  # noqa: E402
from r1kit.tokenizer import train_tokenizer  # noqa: E402
from r1kit.train import grpo  # noqa: E402
from r1kit.train.config import read_toml  # noqa: E402

RECIPE = ROOT / "recipes" / "r1zero-countdown.toml"


def completion_text(task, sample, sloppy: bool) -> str:
    """What the base learns to write after the prompt's `<think>`."""
    steps, expression = task.worked_solution(sample, sloppy=sloppy)
    return f"{steps} </think> <answer>{expression}</answer>"


def pretrain_base(model, tok, task, config, samples, seconds: float, batch_size: int, lr: float,
                  sloppy_fraction: float, seed: int) -> dict:
    """Next-token loss on the completions (prompt tokens masked), AdamW with warmup + cosine, until
    `seconds` of wall time have passed. Returns steps and final loss."""
    prompt_fn = grpo.prompt_fn_for(config.template, tok)
    rng = random.Random(seed)
    eos = tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    start, step, loss_ema = time.perf_counter(), 0, None
    model.train()
    while (elapsed := time.perf_counter() - start) < seconds:
        frac = elapsed / seconds
        for g in opt.param_groups:  # 20-step warmup, then cosine to 10%
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        rows = []
        for s in (rng.choice(samples) for _ in range(batch_size)):
            rows.append((prompt_fn(s), tok.encode(completion_text(task, s, rng.random() < sloppy_fraction)) + [eos]))
        width = max(len(p) + len(c) for p, c in rows)
        ids, mask = torch.full((len(rows), width), eos), torch.zeros(len(rows), width)
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, len(p):len(p) + len(c)] = 1
        loss = model.loss(ids, mask)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_router_bias()
        step += 1
        loss_ema = float(loss.detach()) if loss_ema is None else 0.95 * loss_ema + 0.05 * float(loss.detach())
        if step % 100 == 0:
            print(f"  pretrain step {step} loss {loss_ema:.3f} ({elapsed:.0f}s)", flush=True)
    model.eval()
    return {"steps": step, "loss": loss_ema}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-seconds", type=float, default=240)
    ap.add_argument("--max-steps", type=int, default=None, help="GRPO steps (default: the recipe's)")
    ap.add_argument("--eval-problems", type=int, default=100)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared 2-core machine)")
    ap.add_argument("--save-base", default=None, help="also save the pretrained base here (a Hugging Face folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", choices=("dense", "tiny"), default="dense",
                    help="dense: a 0.8M-parameter Qwen2-layout model (fast on 2 CPU cores); tiny: the "
                         "DeepSeek-V3 miniature preset (MLA + MoE + MTP), ~4x slower per step here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config, _ = grpo.config_from_dict(read_toml(RECIPE), str(RECIPE))
    config.output_dir, config.save_every, config.progress = None, 0, True
    if args.max_steps is not None:
        config.max_steps = args.max_steps
    task = make_task(config.task, **config.task_kwargs)
    train = task.generate(config.num_train_samples, seed=config.seed)
    seen = {s["prompt"] for s in train}
    held_out = [s for s in task.generate(4 * args.eval_problems, seed=config.seed + 10_000)
                if s["prompt"] not in seen][: args.eval_problems]

    tok = train_tokenizer([], kind="char")
    if args.base == "tiny":
        model_config = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=256)
    else:
        model_config = ModelConfig(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=128,
                                   intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    model = Transformer(model_config)
    print(f"base: {args.base} ({model.num_parameters() / 1e6:.2f}M parameters), countdown "
          f"{config.task_kwargs}, {len(train)} training problems, {len(held_out)} held out", flush=True)
    t0 = time.perf_counter()
    pre = pretrain_base(model, tok, task, config, train, args.pretrain_seconds, batch_size=32, lr=2e-3,
                        sloppy_fraction=0.5, seed=args.seed)
    pretrain_min = (time.perf_counter() - t0) / 60
    if args.save_base:
        import r1kit

        r1kit.save(model, tok, args.save_base)
        print(f"saved the base to {args.save_base}")

    def pass1():
        return grpo.evaluate_pass1(model, tok, held_out, config, k=args.k)["pass@1"]

    t1 = time.perf_counter()
    before = pass1()
    print(f"held-out pass@1 before RL: {100 * before:.1f}%  (k={args.k}, T=0.6, top-p 0.95)", flush=True)
    t2 = time.perf_counter()
    result = grpo.train_grpo(config, model, tok, train_samples=train)
    rl_min = (time.perf_counter() - t2) / 60
    after = pass1()
    eval_min = (time.perf_counter() - t1) / 60 - rl_min
    h = result.history
    print(f"held-out pass@1 after {len(h)} GRPO steps: {100 * after:.1f}%  ({100 * (after - before):+.1f} points)")
    print(f"train reward {h[0]['reward']:.3f} -> {sum(x['reward'] for x in h[-5:]) / 5:.3f} (last 5 steps), "
          f"accuracy {h[0]['accuracy']:.3f} -> {sum(x['accuracy'] for x in h[-5:]) / 5:.3f}")
    print(f"time: pretrain {pretrain_min:.1f} min, R1-Zero GRPO {rl_min:.1f} min "
          f"({60 * rl_min / max(1, len(h)):.2f} s/step), eval {eval_min:.1f} min")
    print(json.dumps({
        "pass1_before": round(100 * before, 1), "pass1_after": round(100 * after, 1),
        "points_gained": round(100 * (after - before), 1), "grpo_minutes": round(rl_min, 2),
        "grpo_steps": len(h), "seconds_per_step": round(60 * rl_min / max(1, len(h)), 3),
        "pretrain_minutes": round(pretrain_min, 2), "pretrain_steps": pre["steps"], "eval_k": args.k,
        "eval_problems": len(held_out), "skipped_steps": result.skipped_steps,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
