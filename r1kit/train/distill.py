"""`r1kit distill`: rejection-sample a teacher, keep what verifies, train a student on it (R1 stage 3).

    teacher samples k completions per prompt (r1kit.engine)
    -> keep those the rewards score as correct AND well-formed (accuracy == 1, format == 1)
    -> drop duplicates (per prompt, whitespace-normalised)
    -> dataset.jsonl {"prompt", "completion", "task", "answer"} + dataset_stats.json
       (kept rate per task, completion-length histogram)
    -> SFT of the student on it (r1kit.train.sft), accuracy before and after on held-out prompts.

This is how R1's authors made the R1-Distill models: ~800k verified samples, SFT only.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1kit.checkpoint import atomic_write_text


@dataclass
class DistillConfig:
    teacher: str = ""  # an HF folder (an r1kit checkpoint or a downloaded model)
    student: str = ""  # a preset (fresh weights, teacher's tokenizer) or an HF folder; empty: skip SFT
    task: str = "arithmetic"  # an r1kit.tasks generator, or a benchmark name / JSONL path (e.g. gsm8k_train)
    eval_task: str = ""  # held-out prompts for a benchmark task (e.g. gsm8k); default: rows after the training ones
    task_kwargs: dict = field(default_factory=dict)
    num_prompts: int = 256
    num_generations: int = 4  # k samples per prompt
    num_eval_prompts: int = 64  # held-out prompts for the accuracy before/after
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    template: str = "r1zero"  # how prompts are rendered: r1zero | chat | none (as in SFT)
    format_style: str = "any"  # format_reward style: any | r1 | r1_zero
    eval_temperature: float = 0.6  # R1's evaluation setting
    max_batch_size: int = 64
    seed: int = 0
    output_dir: str = "runs/distill"
    sft: dict = field(default_factory=dict)  # SFTConfig keys for the student run


# ---------------------------------------------------------------------------- selection (pure)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def verified(completion: str, sample: dict, format_style: str = "any") -> bool:
    from r1kit.rewards import accuracy_reward, format_reward

    try:
        return accuracy_reward(completion, sample) == 1.0 and format_reward(completion, sample, style=format_style) == 1.0
    except Exception:  # a completion a reward cannot parse is simply not kept
        return False


def select(samples: list[dict], completions: list[list[str]], lengths: list[list[int]] | None = None,
           format_style: str = "any") -> tuple[list[dict], dict]:
    """Keep verified, deduplicated completions. completions[i] are the k texts for samples[i]."""
    rows, per_task = [], {}
    kept_lengths = []
    duplicates = 0
    for i, (sample, texts) in enumerate(zip(samples, completions)):
        seen = set()
        stats = per_task.setdefault(sample["task"], {"generated": 0, "verified": 0, "kept": 0, "prompts_with_one": 0})
        kept_here = 0
        for j, text in enumerate(texts):
            stats["generated"] += 1
            if not verified(text, sample, format_style):
                continue
            stats["verified"] += 1
            key = _norm(text)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            kept_here += 1
            rows.append({"prompt": sample["prompt"], "completion": text, "task": sample["task"],
                         "answer": sample["answer"]})
            kept_lengths.append(lengths[i][j] if lengths else len(text))
        stats["kept"] += kept_here
        stats["prompts_with_one"] += kept_here > 0
    for stats in per_task.values():
        stats["kept_rate"] = stats["kept"] / max(stats["generated"], 1)
        stats["verified_rate"] = stats["verified"] / max(stats["generated"], 1)
    return rows, {"per_task": per_task, "duplicates_dropped": duplicates, "kept": len(rows),
                  "length_histogram": histogram(kept_lengths)}


def histogram(lengths: list[int]) -> dict[str, int]:
    """Counts by power-of-two length bucket: {"<=16": n, "<=32": m, ...}."""
    out: dict[str, int] = {}
    for n in sorted(lengths):
        bucket = 2 ** max(4, math.ceil(math.log2(max(n, 1))))
        out[f"<={bucket}"] = out.get(f"<={bucket}", 0) + 1
    return out


# ---------------------------------------------------------------------------- sampling and scoring


def _prompt_ids(tokenizer, samples: list[dict], template: str) -> tuple[list[list[int]], list[dict]]:
    from r1kit.data import render_prompt

    ids, marked = [], []
    for s in samples:
        text, has_special = render_prompt(tokenizer, s["prompt"], template)
        ids.append(tokenizer.encode(text, add_special_tokens=not has_special))
        meta = dict(s.get("meta") or {})
        meta["prompt_opened_think"] = text.endswith("<think>\n")
        marked.append({**s, "meta": meta})
    return ids, marked


def sample_completions(model, tokenizer, samples: list[dict], config: DistillConfig, n: int, temperature: float,
                       seed: int) -> tuple[list[list[str]], list[list[int]], list[dict]]:
    from r1kit.engine import Engine, SamplingParams

    prompts, marked = _prompt_ids(tokenizer, samples, config.template)
    engine = Engine(model, tokenizer, max_batch_size=config.max_batch_size,
                    max_seq_len=max(len(p) for p in prompts) + config.max_tokens)
    params = SamplingParams(n=n, max_tokens=config.max_tokens, temperature=temperature,
                            top_p=config.top_p if temperature > 0 else 1.0, seed=seed)
    gens = engine.generate(prompts, params)
    texts = [[g.text or "" for g in gens[i * n:(i + 1) * n]] for i in range(len(samples))]
    lengths = [[len(g.token_ids) for g in gens[i * n:(i + 1) * n]] for i in range(len(samples))]
    return texts, lengths, marked


def accuracy(model, tokenizer, samples: list[dict], config: DistillConfig) -> float:
    """pass@1 at the evaluation temperature: share of correct answers (format not required)."""
    from r1kit.rewards import accuracy_reward

    was_training = model.training
    texts, _, marked = sample_completions(model, tokenizer, samples, config, 1, config.eval_temperature, config.seed + 1)
    model.train(was_training)
    return sum(accuracy_reward(t[0], s) for t, s in zip(texts, marked)) / max(len(samples), 1)


@dataclass
class DistillResult:
    dataset: Path
    stats: dict
    student_path: Path | None
    accuracy_before: float | None
    accuracy_after: float | None


def prompt_sets(config: DistillConfig) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts): from a task generator (two seeds), or from benchmark
    files -- R1's distillation prompts were real problems, e.g. GSM8K's training split."""
    from r1kit.tasks import TASKS, load_benchmark, make_task

    if config.task in TASKS:
        task = make_task(config.task, **config.task_kwargs)
        return (task.generate(config.num_prompts, seed=config.seed),
                task.generate(config.num_eval_prompts, seed=config.seed + 10_000))
    if config.eval_task:
        return (load_benchmark(config.task, limit=config.num_prompts),
                load_benchmark(config.eval_task, limit=config.num_eval_prompts))
    rows = load_benchmark(config.task, limit=config.num_prompts + config.num_eval_prompts)
    if len(rows) <= config.num_prompts:
        raise ValueError(f"distill: {config.task} has {len(rows)} problems, too few for {config.num_prompts} "
                         f"training prompts plus held-out ones; set eval_task (e.g. \"gsm8k\") or lower num_prompts")
    return rows[:config.num_prompts], rows[config.num_prompts:]


def distill(config: DistillConfig, teacher=None, tokenizer=None, student=None) -> DistillResult:
    import r1kit
    from r1kit.train.sft import SFTConfig, train_sft

    if teacher is None:
        if not config.teacher:
            raise ValueError("distill: set teacher = \"path/to/model\" (an HF folder or r1kit checkpoint)")
        teacher, tokenizer = r1kit.load(config.teacher)
    if tokenizer is None:
        raise ValueError(f"distill: the teacher {config.teacher} has no tokenizer.json")
    prompts, held_out = prompt_sets(config)
    out = Path(config.output_dir)
    texts, lengths, marked = sample_completions(teacher, tokenizer, prompts, config, config.num_generations,
                                                config.temperature, config.seed)
    rows, stats = select(marked, texts, lengths, config.format_style)
    stats.update(teacher=config.teacher, task=config.task, num_prompts=config.num_prompts,
                 num_generations=config.num_generations, temperature=config.temperature)
    dataset = out / "dataset.jsonl"
    atomic_write_text(dataset, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "dataset_stats.json", json.dumps(stats, indent=2))
    result = DistillResult(dataset, stats, None, None, None)
    if not (config.student or student is not None) or not rows:
        return result
    sft_values = {"mode": "sft", "template": config.template, "output_dir": str(out / "student"),
                  "model": config.student or "tiny", "progress": False, **config.sft}
    sft_config = SFTConfig(**sft_values)
    if student is None:
        from r1kit.train.sft import resolve_model_config

        torch.manual_seed(sft_config.seed)
        if sft_config.model in _presets():
            from r1kit.model import Transformer

            student = Transformer(resolve_model_config(sft_config, tokenizer))
        else:
            student, _ = r1kit.load(sft_config.model)
    result.accuracy_before = accuracy(student, tokenizer, held_out, config)
    trained = train_sft(sft_config, model=student, tokenizer=tokenizer, train_samples=rows)
    result.accuracy_after = accuracy(trained.model, tokenizer, held_out, config)
    result.student_path = trained.final_path
    stats.update(student_accuracy_before=result.accuracy_before, student_accuracy_after=result.accuracy_after)
    atomic_write_text(out / "dataset_stats.json", json.dumps(stats, indent=2))
    return result


def _presets():
    from r1kit.model.config import PRESETS

    return PRESETS


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="TOML recipe of DistillConfig keys ([sft] for the student)")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def main(args: argparse.Namespace) -> int:
    from r1kit.train.config import load_recipe

    config = load_recipe(DistillConfig, args.config, args.overrides)
    result = distill(config)
    summary = {"dataset": str(result.dataset), "kept": result.stats["kept"],
               "kept_rate": {t: s["kept_rate"] for t, s in result.stats["per_task"].items()},
               "student": str(result.student_path) if result.student_path else None,
               "accuracy_before": result.accuracy_before, "accuracy_after": result.accuracy_after}
    print(json.dumps(summary))
    return 0
