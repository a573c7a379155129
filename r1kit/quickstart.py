"""`r1kit quickstart`: the whole DeepSeek-R1 recipe in miniature, on a laptop CPU, with no downloads.

It runs `recipes/quickstart.toml` through the pipeline (the same stage code `r1kit run` uses):

    1. a char-level tokenizer and a tiny DeepSeek-V3-style base (MLA + DeepSeekMoE + MTP) pretrained
       on worked 3-digit additions, half of them by a solver that never carries: like V3-Base, the
       base can sample a right answer now and then, and a systematic wrong one otherwise;
    2. pass@1 / cons@k of the base on held-out problems (k samples at T=0.6, top-p 0.95);
    3. R1-Zero: GRPO straight from the base with rule rewards (accuracy + format);
    4. the same evaluation of the RL model;
    5. distillation: rejection-sample the RL model, SFT a smaller dense (Qwen2-layout) student;
    6. the same evaluation of the student;

then writes `runs/quickstart/report.html` + `report.md` (plots, before/after table, traces) and
`summary.json`. Stages already finished are skipped, so an interrupted quickstart continues.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from r1kit.checkpoint import atomic_write_text

RECIPE = "quickstart"

# --smoke: the same chain at the smallest size, for CI (a couple of minutes on 2 cores)
SMOKE = {
    "base": {"num_documents": 256, "max_steps": 6, "batch_size": 8, "warmup_steps": 1,
             "model_overrides": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                 "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                                 "qk_rope_head_dim": 8, "v_head_dim": 16, "moe_intermediate_size": 32}},
    "eval_base": {"num_problems": 4, "k": 2, "max_tokens": 48},
    "rl": {"num_train_samples": 32, "grpo": {"num_generations": 4, "batch_size": 8, "max_completion_length": 48,
                                              "temperature": 1.0, "learning_rate": 2e-4, "beta": 0.0, "max_steps": 2,
                                              "sample_every": 1}},
    "eval_rl": {"num_problems": 4, "k": 2, "max_tokens": 48},
    "student": {"num_prompts": 8, "k": 2, "max_tokens": 48, "max_steps": 3, "batch_size": 4, "warmup_steps": 1,
                "fill_with_references": True,
                "student_overrides": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}},
    "eval_student": {"num_problems": 4, "k": 2, "max_tokens": 48},
}


def build_summary(results: dict[str, dict], run_dir: Path, wall_seconds: float) -> dict:
    """summary.json: pass@1 (percent) and interval, cons@k for base, RL model and student; time."""
    summary: dict = {"run_dir": str(run_dir)}
    for role, stage in (("base", "eval_base"), ("rl", "eval_rl"), ("student", "eval_student")):
        r = results.get(stage) or {}
        if "pass1" in r:
            summary[f"{role}_pass1"] = round(r["pass1"], 2)
            summary[f"{role}_pass1_ci"] = [round(x, 2) for x in r["pass1_ci"]]
            summary[f"{role}_cons_at_k"] = round(r["cons_at_k"], 2)
            summary[f"{role}_pass_at_k"] = r["pass_at_k"]
    first = results.get("eval_base", {})
    summary.update(k=first.get("k"), num_problems=first.get("num_problems"), temperature=first.get("temperature"),
                   top_p=first.get("top_p"))
    stage_seconds = {name: round(r.get("seconds", 0.0), 1) for name, r in results.items()}
    summary["stage_seconds"] = stage_seconds
    # minutes: the stages' own measured time (a resumed run adds the earlier runs' stage times)
    summary["minutes"] = round(sum(stage_seconds.values()) / 60, 2)
    summary["wall_minutes_this_invocation"] = round(wall_seconds / 60, 2)
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    parser.add_argument("--fresh", action="store_true", help="delete an earlier run in --out and start over")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, for CI: checks the chain, not the numbers")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: the idle cores)")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    import torch

    from r1kit import pipeline, report

    threads = args.threads or pipeline.auto_threads()
    torch.set_num_threads(threads)
    run_dir = Path(args.out)
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    recipe = pipeline.load_recipe(RECIPE, overrides=SMOKE if args.smoke else None)
    recipe["name"] = run_dir.name
    progress = not args.no_progress
    started = time.perf_counter()
    results = pipeline.run(recipe, run_dir, progress=progress)
    summary = build_summary(results, run_dir, time.perf_counter() - started)
    summary["smoke"] = bool(args.smoke)
    summary["threads"] = threads
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    written = report.render(run_dir, recipe, summary, title="r1kit quickstart" + (" (smoke)" if args.smoke else ""))
    _print_result(summary, run_dir, written)
    return 0


def _print_result(summary: dict, run_dir: Path, written: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        table = Table(title="held-out pass@1 (95% CI), cons@k")
        for col in ("model", "pass@1", "95% CI", "cons@k"):
            table.add_column(col, justify="right" if col != "model" else "left")
        for role in ("base", "rl", "student"):
            if f"{role}_pass1" in summary:
                lo, hi = summary[f"{role}_pass1_ci"]
                table.add_row(role, f"{summary[f'{role}_pass1']:.1f}", f"{lo:.1f}-{hi:.1f}",
                              f"{summary[f'{role}_cons_at_k']:.1f}")
        console.print(table)
        say = console.print
    except ImportError:
        say = print
    say(f"done in {summary['minutes']:.1f} min")
    say(f"report:  {written['report.html'].resolve()}")
    say(f"         {written['report.md'].resolve()}")
    say(f"summary: {(run_dir / 'summary.json').resolve()}")
    say("talk to the RL model and serve it (OpenAI-compatible, with reasoning_content):")
    say(f"  r1kit chat {run_dir}/rl")
    say(f"  r1kit serve {run_dir}/rl")
    sys.stdout.flush()
