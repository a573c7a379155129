"""Evaluation as the DeepSeek-R1 report measures it (R1 §3).

For each problem, sample k completions at temperature 0.6 and top-p 0.95 (no greedy decoding),
extract the final answer from the text after `</think>`, and verify it with the task's rule
reward. Then report:

- **pass@1**: the mean correctness over all k samples of all problems, with a 95% confidence
  interval. The interval is a normal interval over the *per-problem* means (each problem's share of
  correct samples): mean ± 1.96 · std(per-problem means, ddof=1) / sqrt(#problems). Problems are the
  independent unit; the k samples of one problem are not independent of each other.
- **cons@k**: majority vote over the k extracted answers (after normalisation); a problem counts
  when the most frequent answer is a correct one. Ties go to the answer seen first (so the vote is
  deterministic). Completions with no extractable answer do not vote.
- **pass@k** (unbiased, Chen et al. 2021): 1 − C(n−c, k) / C(n, k) per problem, averaged.

The statistics are plain functions of lists of booleans and strings (tests check them against hand
computations); `evaluate` runs a model (anything with `Engine.generate`'s interface) over samples,
appends every completion with its verdict to a JSONL file as it goes, and resumes from that file
when an evaluation is interrupted.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_K = 4
DEFAULT_TEMPERATURE = 0.6  # R1 §3: temperature 0.6, top-p 0.95, k samples per problem
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_TOKENS = 2048  # R1 used 32,768; pass --max-tokens 32768 for a faithful (slow) run
Z95 = 1.959963984540054  # two-sided 95% normal quantile


# ============================================================================ statistics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: n samples, c of them correct (Chen et al. 2021, Eq. 1).

    The probability that at least one of k samples drawn without replacement from the n is
    correct: 1 - C(n-c, k) / C(n, k), computed as a product to stay exact for large n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n (samples per problem), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_ci(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): a normal confidence interval for the mean of independent values.

    With fewer than two values the spread is unknown and the interval collapses to the mean.
    """
    if not values:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, mean, mean
    half = z * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def pass_at_1(correct: Sequence[Sequence[bool]]) -> tuple[float, float, float]:
    """pass@1 and its 95% interval, as fractions: the mean over problems of each problem's share
    of correct samples (equal to the mean over all samples when every problem has k samples)."""
    per_problem = [sum(map(bool, c)) / len(c) for c in correct if len(c)]
    mean, low, high = mean_ci(per_problem)
    return mean, max(0.0, low), min(1.0, high)


_SPACES = re.compile(r"\s+")


def normalize_answer(answer: Any) -> str | None:
    """A canonical string for voting: whitespace removed, `\\text{}`/`$`/trailing period dropped,
    numbers written the same way (12.0 -> 12, 1,000 -> 1000). None/empty stays None."""
    if answer is None:
        return None
    text = str(answer).strip()
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = text.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\left", "").replace("\\right", "")
    text = _SPACES.sub("", text).rstrip(".")
    if re.fullmatch(r"[-+]?[\d,]*\.?\d+", text):
        try:
            value = float(text.replace(",", ""))
            text = str(int(value)) if value.is_integer() else repr(value)
        except ValueError:
            pass
    return text or None


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample holding the most frequent normalised answer, or None when no
    sample has an answer. Ties go to the answer that appears first (deterministic)."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        key = normalize_answer(a)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[best]


def cons_at_k(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> float:
    """Share of problems whose majority-vote answer is correct (the verdict of the sample that
    carries it: all samples with the same normalised answer share a verdict)."""
    if len(answers) != len(correct):
        raise ValueError("cons_at_k: answers and correct need one entry per problem")
    hits = 0
    for ans, ok in zip(answers, correct):
        winner = majority_vote(ans)
        hits += winner is not None and bool(ok[winner])
    return hits / len(answers) if answers else 0.0


def summarize(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence[str | None]],
              lengths: Sequence[Sequence[int]] | None = None) -> dict:
    """All of an evaluation's figures from per-problem verdicts and extracted answers.

    Percentages (0-100) throughout, as the R1 report writes them.
    """
    if not correct:
        raise ValueError("nothing to summarise: no problems were evaluated")
    n = min(len(c) for c in correct)
    mean, low, high = pass_at_1(correct)
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, n) if k <= n})
    out = {
        "num_problems": len(correct),
        "k": n,
        "num_samples": sum(len(c) for c in correct),
        "pass1": 100 * mean,
        "pass1_ci": [100 * low, 100 * high],
        "cons_at_k": 100 * cons_at_k(answers, correct),
        "pass_at_k": {str(k): 100 * sum(pass_at_k(len(c), sum(map(bool, c)), k) for c in correct) / len(correct)
                      for k in ks},
    }
    if lengths is not None:
        flat = [x for row in lengths for x in row]
        out["mean_tokens"] = sum(flat) / max(len(flat), 1)
    return out


# ============================================================================ answers and verdicts


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion, for voting: from the text after `</think>`, the content of
    the last `<answer>` tag, else of the last `\\boxed{}`, else the last line. None when the
    completion has no answer part (e.g. it was cut off inside its thinking)."""
    from r1kit.tokenizer import THINK_OPEN, split_reasoning

    # R1's evaluation prompt opens the thinking, so a completion without `<think>` starts inside it
    answer = split_reasoning(completion, prompt_opened_think=THINK_OPEN not in completion).answer
    if not answer:
        return None
    tags = re.findall(r"<answer>(.*?)</answer>", answer, flags=re.S)
    if tags:
        answer = tags[-1]
    boxed = last_boxed(answer)
    if boxed is not None:
        return boxed.strip()
    lines = [line for line in answer.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def default_scorer(completion: str, sample: dict) -> float:
    """The task's accuracy reward (1.0 correct, 0.0 not): r1kit.rewards knows each task's verifier."""
    from r1kit import rewards

    return float(rewards.accuracy_reward(completion, sample))


# ============================================================================ benchmarks


HELDOUT_SEED = 10_007  # synthetic held-out problems; training sets drop any prompt drawn here
DEFAULT_SYNTHETIC_PROBLEMS = 200


def load_samples(benchmark: str, limit: int | None = None, task_kwargs: dict | None = None,
                 seed: int = HELDOUT_SEED) -> list[dict]:
    """Samples of a benchmark by name (aime24, math500, gsm8k, gpqa, humaneval, ...), by path to a
    JSONL file, or a synthetic task (arithmetic, countdown, ...: `limit` problems, default 200, drawn
    with the held-out `seed`). Errors name what exists and where it looked."""
    from r1kit import tasks

    if str(benchmark) in tasks.TASKS:
        task = tasks.make_task(str(benchmark), **(task_kwargs or {}))
        return task.generate(DEFAULT_SYNTHETIC_PROBLEMS if limit is None else limit, seed=seed)
    try:
        return list(tasks.load_benchmark(benchmark, limit=limit))
    except FileNotFoundError as err:
        from r1kit.paths import benchmarks_dir

        folder = benchmarks_dir()
        there = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(f"{err}; files there: {', '.join(there) or 'none (the folder is missing)'}; "
                                f"benchmarks by name: {', '.join(sorted(tasks.BENCHMARKS))}") from None
    except ValueError as err:
        if "unknown benchmark" in str(err):
            raise ValueError(f"{err}; or a synthetic task: {', '.join(sorted(tasks.TASKS))}") from None
        raise


# ============================================================================ running a model


def build_prompt(tokenizer, sample: dict, prompt_fn: Callable[[dict], str] | None = None) -> str:
    """R1's evaluation prompt: the question as the single user turn (no system prompt), rendered with
    the model's chat template, whose generation prompt opens the thinking (`<｜Assistant｜><think>\\n`).
    A tokenizer without a chat template gets r1kit's R1 template."""
    if prompt_fn is not None:
        return prompt_fn(sample)
    from r1kit.tokenizer import r1_prompt

    return r1_prompt(tokenizer, sample["prompt"])


def _completion_text(gen, tokenizer) -> str:
    if getattr(gen, "text", None) is not None:
        return gen.text
    return tokenizer.decode(gen.token_ids, skip_special_tokens=True)


def _read_done(out: Path, k: int, settings: dict) -> tuple[dict[int, list[dict]], int]:
    """Problems already complete in a previous run's file, and the byte length of their records.

    A crash can leave a half-written last group; only whole groups of k records count, and the
    file is cut back to them before appending. A file written with other settings is refused.
    """
    done: dict[int, list[dict]] = {}
    good_bytes = 0
    if not out.exists():
        return done, 0
    pending: list[dict] = []
    offset = 0
    with open(out, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # a torn last line
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                break
            mismatched = {key: (rec.get(key), value) for key, value in settings.items() if rec.get(key) != value}
            if mismatched:
                detail = ", ".join(f"{key}: file has {a!r}, this run {b!r}" for key, (a, b) in mismatched.items())
                raise ValueError(f"{out} line {lineno} holds an evaluation with other settings ({detail}); "
                                 "pass another --out or delete the file to start over")
            pending.append(rec)
            group = [r for r in pending if r["problem"] == rec["problem"]]
            if len(group) == k:
                done[rec["problem"]] = sorted(group, key=lambda r: r["sample"])
                pending = [r for r in pending if r["problem"] != rec["problem"]]
                if not pending:
                    good_bytes = offset
    return done, good_bytes


def evaluate(
    model=None,
    tokenizer=None,
    samples: Sequence[dict] = (),
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    out: str | os.PathLike | None = None,
    engine=None,
    prompt_fn: Callable[[dict], str] | None = None,
    scorer: Callable[[str, dict], float] | None = None,
    benchmark: str = "custom",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Sample k completions per problem, verify them, and summarise (see the module docstring).

    `engine`: anything with `generate(prompts: list[list[int]], params) -> list[Generation]`
    (default: `r1kit.engine.Engine(model, tokenizer)`). `out`: the JSONL log; one line per
    completion, each problem's k lines written and flushed together, so an interrupted run resumes
    at the first problem not in the file. Returns the summary dict (percentages) with "records".
    """
    if k < 1:
        raise ValueError(f"k (samples per problem) must be >= 1, got {k}")
    if not samples:
        raise ValueError("no samples to evaluate (empty benchmark or --limit 0)")
    scorer = scorer or default_scorer
    if engine is None:
        from r1kit.engine import Engine

        engine = Engine(model, tokenizer)
    from r1kit.engine import SamplingParams

    settings = {"benchmark": benchmark, "k": k, "temperature": temperature, "top_p": top_p,
                "max_tokens": max_tokens}
    out_path = Path(out) if out is not None else None
    done: dict[int, list[dict]] = {}
    if out_path is not None:
        done, good_bytes = _read_done(out_path, k, settings)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if out_path.exists() and out_path.stat().st_size != good_bytes:
            with open(out_path, "r+b") as f:  # drop a torn group left by a crash
                f.truncate(good_bytes)
    todo = [i for i in range(len(samples)) if i not in done]
    problems_per_batch = max(1, batch_size // k)
    log = open(out_path, "a", encoding="utf-8") if out_path is not None else None
    started = time.perf_counter()
    try:
        with _progress(progress, total=len(samples), done=len(samples) - len(todo), label=benchmark) as advance:
            for start in range(0, len(todo), problems_per_batch):
                chunk = todo[start:start + problems_per_batch]
                prompts = [tokenizer.encode(build_prompt(tokenizer, samples[i], prompt_fn)) for i in chunk]
                params = SamplingParams(n=k, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                        seed=seed + chunk[0])
                gens = engine.generate(prompts, params)
                if len(gens) != len(chunk) * k:
                    raise RuntimeError(f"generator returned {len(gens)} completions for {len(chunk)} prompts x k={k}")
                for j, i in enumerate(chunk):
                    group = [_record(i, s, samples[i], gens[j * k + s], tokenizer, scorer, settings)
                             for s in range(k)]
                    done[i] = group
                    if log is not None:  # one write per problem: a crash never splits a group...
                        log.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in group))
                        log.flush()
                        os.fsync(log.fileno())  # ...and what is written survives it
                    advance(1)
    finally:
        if log is not None:
            log.close()
    records = [done[i] for i in range(len(samples))]
    summary = summarize([[r["correct"] for r in g] for g in records],
                        [[r["extracted"] for r in g] for g in records],
                        [[r["num_tokens"] for r in g] for g in records])
    summary.update(benchmark=benchmark, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                   seconds=time.perf_counter() - started, records=records)
    if out_path is not None:
        summary["log"] = str(out_path)
    return summary


def _record(problem: int, sample_idx: int, sample: dict, gen, tokenizer, scorer, settings: dict) -> dict:
    text = _completion_text(gen, tokenizer)
    score = float(scorer(text, sample))
    return {
        "problem": problem,
        "sample": sample_idx,
        **settings,
        "task": sample.get("task"),
        "prompt": sample["prompt"],
        "reference": _jsonable(sample.get("answer")),
        "completion": text,
        "extracted": extract_answer(text),
        "score": score,
        "correct": score >= 1.0,
        "finish_reason": getattr(gen, "finish_reason", None),
        "num_tokens": len(gen.token_ids),
    }


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


class _progress:
    """A rich progress bar over problems (rate and ETA), or nothing when progress=False."""

    def __init__(self, enabled: bool, total: int, done: int, label: str):
        self.enabled, self.total, self.done, self.label = enabled, total, done, label

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total, completed=self.done)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


# ============================================================================ presenting results


def summary_table(rows: dict[str, dict], title: str = "Evaluation"):
    """A rich Table: one row per evaluated model/benchmark summary."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "benchmark", "problems", "k", "pass@1 (95% CI)", "cons@k", "pass@k", "mean tokens"):
        table.add_column(col, justify="left" if col in ("model", "benchmark") else "right")
    for name, s in rows.items():
        top_k = str(s["k"])
        table.add_row(name, s.get("benchmark", ""), str(s["num_problems"]), top_k,
                      f"{s['pass1']:.1f} ({s['pass1_ci'][0]:.1f}-{s['pass1_ci'][1]:.1f})",
                      f"{s['cons_at_k']:.1f}", f"{s['pass_at_k'][top_k]:.1f}",
                      f"{s.get('mean_tokens', float('nan')):.0f}")
    return table


def public_summary(summary: dict) -> dict:
    """The summary without the per-completion records (what goes into summary.json files)."""
    return {key: value for key, value in summary.items() if key != "records"}


# ============================================================================ command line


def add_arguments(parser) -> None:
    parser.add_argument("path", help="model folder (Hugging Face layout: config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--benchmark", required=True,
                        help="aime24, aime25, hmmt25, math500, gsm8k, gpqa, humaneval, a synthetic task "
                             "(arithmetic, countdown, ...), or a path to a JSONL file")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="samples per problem (R1: 64 for AIME/GPQA, 16 for MATH-500)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="max generated tokens per sample (R1: 32768)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--out", default=None,
                        help="JSONL of every completion with its verdict (default: <path>/eval/<benchmark>.jsonl); "
                             "an interrupted run resumes from it")
    parser.add_argument("--batch-size", type=int, default=64, help="completions generated together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only quantisation (CPU memory)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    import r1kit
    from rich.console import Console

    samples = load_samples(args.benchmark, limit=args.limit)
    model, tokenizer = r1kit.load(args.path, dtype=args.dtype, device=args.device)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.path}: no tokenizer.json beside the weights; evaluation needs the tokenizer")
    if args.quantize:
        from r1kit import quantize

        model = quantize.quantize(model, args.quantize)
    name = Path(args.benchmark).stem if Path(args.benchmark).suffix else args.benchmark
    out = args.out or str(Path(args.path) / "eval" / f"{name}.jsonl")
    summary = evaluate(model, tokenizer, samples, k=args.k, temperature=args.temperature, top_p=args.top_p,
                       max_tokens=args.max_tokens, out=out, benchmark=name, batch_size=args.batch_size,
                       seed=args.seed, progress=not args.no_progress)
    from r1kit.checkpoint import atomic_write_text

    summary_path = Path(out).with_suffix(".summary.json")
    atomic_write_text(summary_path, json.dumps(public_summary(summary), indent=2) + "\n")
    console = Console()
    console.print(summary_table({Path(args.path).name: summary}, title=f"r1kit eval: {name}"))
    console.print(f"completions: {out}\nsummary: {summary_path}")
    return 0
