"""R1-Zero in miniature: does GRPO alone, from a base model, raise held-out pass@1 on countdown?

    python bench/r1zero.py                       # pretrain a base (~3-4 min), run the recipe, measure
    python bench/r1zero.py --save-base runs/base-countdown   # also keep the base for `r1kit train grpo`

1. Problems: recipes/r1zero-countdown.toml's countdown, form "add_sub" (three numbers in 1..9,
   target x+y-z). The held-out problems are drawn first; pretraining and RL never see their prompts.
2. Base: a 0.8M-parameter char-level Qwen2-layout model (or, --base tiny, the DeepSeek-V3 miniature)
   trained with r1kit's SFT trainer on worked solutions in the R1-Zero shape (r1kit.synthetic):
   `4+3=7 7-5=2; 4+5=9 9-3=6 </think> <answer>4+5-3</answer>`, a short search over the pairs.
   Half are written by a "sloppy" solver that just adds the numbers (never right): a systematic
   wrong mode that survives sampling at temperature 0.6 (DESIGN.md, "What makes the miniature
   R1-Zero work"), so the base's pass@1 is about half of what its arithmetic allows.
3. Held-out pass@1 of the base (k samples at temperature 0.6, top-p 0.95).
4. The recipe, unchanged except for the model, run in-process with train_grpo (rollouts at T=1,
   reward = countdown accuracy + R1-Zero format).
5. Held-out pass@1 again. Minutes per phase; last line: one JSON object of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1kit.model import ModelConfig, Transformer  # noqa: E402
from r1kit.synthetic import worked_corpus  # noqa: E402
from r1kit.tasks import make_task  # noqa: E402
from r1kit.tokenizer import train_tokenizer  # noqa: E402
from r1kit.train import grpo  # noqa: E402
from r1kit.train.config import read_toml  # noqa: E402
from r1kit.train.sft import SFTConfig, train_sft  # noqa: E402

RECIPE = ROOT / "recipes" / "r1zero-countdown.toml"
HELD_OUT_SEED = 10_000  # added to the recipe's seed


def split_problems(task, num_held_out: int, num_train: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(held_out, train): `num_held_out` distinct problems of another seed, and `num_train` training
    problems with every held-out prompt removed (the easy form has only a few thousand prompts, so
    without this most held-out problems would have been trained on)."""
    held_out, seen = [], set()
    for s in task.generate(20 * num_held_out, seed=seed + HELD_OUT_SEED):
        if s["prompt"] not in seen:
            seen.add(s["prompt"])
            held_out.append(s)
        if len(held_out) == num_held_out:
            break
    train = [s for s in task.generate(num_train, seed=seed) if s["prompt"] not in seen]
    return held_out, train


def base_model(kind: str, tok) -> Transformer:
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, max_position_embeddings=256)
    if kind == "tiny":
        return Transformer(ModelConfig.preset("tiny", **ids))
    return Transformer(ModelConfig(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **ids))


def pretrain_base(model, tok, task, train: list[dict], template: str, args) -> dict:
    """Completion-only next-token loss on the worked-solution corpus with r1kit's SFT trainer. The
    prompt is rendered with the recipe's template, exactly as GRPO and the evaluation will see it."""
    rows, stats = worked_corpus(task, train, args.num_documents, sloppy_fraction=args.sloppy_fraction, seed=args.seed)
    rows = [{"prompt": template.replace("{prompt}", r["prompt"]), "completion": r["completion"]} for r in rows]
    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(mode="sft", template="none", packing=False, max_length=256,
                           learning_rate=args.pretrain_lr, warmup_steps=20, lr_scheduler_type="cosine",
                           weight_decay=0.1, per_device_train_batch_size=args.pretrain_batch_size,
                           max_steps=args.pretrain_steps, seed=args.seed, output_dir=scratch, save_final=False,
                           save_steps=0, device="cpu", progress=True, logging_steps=25)
        result = train_sft(config, model=model, tokenizer=tok, train_samples=rows)
    model.eval()
    last = [m["lm_loss"] for m in result.metrics if "lm_loss" in m][-5:]
    return {**stats, "steps": result.steps, "loss": sum(last) / max(1, len(last))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-steps", type=int, default=650)
    ap.add_argument("--pretrain-batch-size", type=int, default=32)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--num-documents", type=int, default=16_000, help="worked solutions in the base's corpus")
    ap.add_argument("--sloppy-fraction", type=float, default=0.5)
    ap.add_argument("--max-steps", type=int, default=None, help="GRPO steps (default: the recipe's)")
    ap.add_argument("--eval-problems", type=int, default=None, help="held-out problems (default: the recipe's)")
    ap.add_argument("--k", type=int, default=None, help="samples per held-out problem (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: a 0.8M model gains little from a second core, and loses a lot "
                         "when another process holds it)")
    ap.add_argument("--save-base", default=None, help="also save the pretrained base here (a Hugging Face folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", choices=("dense", "tiny"), default="dense",
                    help="dense: a 0.8M-parameter Qwen2-layout model (fast on 2 CPU cores); tiny: the "
                         "DeepSeek-V3 miniature preset (MLA + MoE + MTP), several times slower per step here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    config, _ = grpo.config_from_dict(read_toml(RECIPE), str(RECIPE))
    config.output_dir, config.save_every, config.progress = None, 0, True
    config.seed = args.seed
    if args.max_steps is not None:
        config.max_steps = args.max_steps
    k = args.k or config.eval_k
    task = make_task(config.task, **config.task_kwargs)
    held_out, train = split_problems(task, args.eval_problems or config.num_eval_samples,
                                     config.num_train_samples, args.seed)

    tok = train_tokenizer([], kind="char")
    model = base_model(args.base, tok)
    print(f"base: {args.base} ({model.num_parameters() / 1e6:.2f}M parameters), countdown {config.task_kwargs}, "
          f"{len(train)} training problems, {len(held_out)} held out, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    t0 = time.perf_counter()
    pre = pretrain_base(model, tok, task, train, config.template, args)
    pretrain_min = (time.perf_counter() - t0) / 60
    print(f"pretrained {pre['steps']} steps on {pre['documents']} documents ({pre['sloppy_documents']} sloppy), "
          f"loss {pre['loss']:.3f}, {pretrain_min:.1f} min", flush=True)
    if args.save_base:
        import r1kit

        r1kit.save(model, tok, args.save_base)
        print(f"saved the base to {args.save_base}")

    def pass1() -> float:
        return grpo.evaluate_pass1(model, tok, held_out, config, k=k)["pass@1"]

    t1 = time.perf_counter()
    before = pass1()
    eval_min = (time.perf_counter() - t1) / 60
    print(f"held-out pass@1 before RL: {100 * before:.1f}%  (k={k}, T=0.6, top-p 0.95, {eval_min:.1f} min)", flush=True)

    t2 = time.perf_counter()
    model.train()
    result = grpo.train_grpo(config, model, tok, train_samples=train)
    rl_min = (time.perf_counter() - t2) / 60

    t3 = time.perf_counter()
    after = pass1()
    eval_min += (time.perf_counter() - t3) / 60
    total_min = (time.perf_counter() - started) / 60

    h = result.history
    n = min(5, len(h))
    print(f"held-out pass@1 after {len(h)} GRPO steps: {100 * after:.1f}%  ({100 * (after - before):+.1f} points)")
    if h:
        print(f"train accuracy {h[0]['accuracy']:.3f} -> {sum(x['accuracy'] for x in h[-n:]) / n:.3f} (last {n} steps), "
              f"reward {h[0]['reward']:.3f} -> {sum(x['reward'] for x in h[-n:]) / n:.3f}")
    print(f"minutes: pretrain {pretrain_min:.2f}, GRPO {rl_min:.2f} ({60 * rl_min / max(1, len(h)):.2f} s/step), "
          f"eval {eval_min:.2f} (two passes), total {total_min:.2f}; load average {os.getloadavg()[0]:.2f}")
    print(json.dumps({
        "base_pass1": round(100 * before, 1), "rl_pass1": round(100 * after, 1),
        "points_gained": round(100 * (after - before), 1), "minutes": round(total_min, 2),
        "pretrain_minutes": round(pretrain_min, 2), "grpo_minutes": round(rl_min, 2), "eval_minutes": round(eval_min, 2),
        "pretrain_steps": pre["steps"], "pretrain_loss": round(pre["loss"], 4), "grpo_steps": len(h),
        "seconds_per_grpo_step": round(60 * rl_min / max(1, len(h)), 3), "skipped_steps": result.skipped_steps,
        "eval_k": k, "eval_problems": len(held_out), "threads": args.threads, "base": args.base,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
