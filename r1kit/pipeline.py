"""The DeepSeek-R1 recipe as a declarative chain of stages (`recipes/*.toml`, `r1kit run RECIPE`).

A recipe names its stages in order; each stage has a `kind` and reads earlier stages' outputs by
name (`model = "base"`, `data = "cold_start"`, `teacher = "rl"`):

    pretrain          tokenizer + base model trained on a synthetic corpus of worked solutions -> model
    grpo              R1-Zero / reasoning RL from a model with rule rewards                        -> model
    rejection_sample  sample a model, keep verified (and readable) completions                     -> dataset
    sft               supervised fine-tuning of a model (or a fresh preset) on datasets            -> model
    distill           rejection-sample a teacher, SFT a fresh smaller student on what verifies     -> model
    eval              pass@1 (95% CI), cons@k, pass@k on a benchmark or held-out synthetic task    -> metrics

The whole chain is checked before the first stage runs (unknown kinds and keys, inputs that name
no earlier stage or the wrong kind of output, a model family a stage does not accept). Each stage
writes `runs/<recipe>/<stage>/` atomically (a crash leaves no half-written stage) with a `DONE`
marker holding its figures and timing; `r1kit run` skips stages that are done and resumes at the
first unfinished one. Model stages write Hugging Face folders, so `r1kit chat runs/<recipe>/<stage>`
works on any of them. The quickstart is this module running `recipes/quickstart.toml`.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from r1kit.checkpoint import atomic_dir, atomic_write_text
from r1kit.synthetic import worked_completion, worked_corpus

DONE = "DONE"
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"

# ================================================================================ stage kinds


@dataclass(frozen=True)
class Kind:
    inputs: dict[str, str]  # key -> the kind of output it must name ("model" | "dataset")
    output: str  # "model" | "dataset" | "metrics"
    defaults: dict[str, Any]  # every key the stage accepts, with its default
    run: Callable | None = None


COMMON = {"name": None, "kind": None, "task": "arithmetic", "task_kwargs": {}, "seed": 0, "family": None}

KINDS: dict[str, Kind] = {
    "pretrain": Kind({}, "model", dict(
        model="tiny", model_overrides={}, tokenizer_kind="char", num_documents=16_000, sloppy_fraction=0.5,
        max_steps=400, batch_size=32, learning_rate=2e-3, warmup_steps=20, threads=0)),
    "grpo": Kind({"model": "model"}, "model", dict(
        model=None, num_train_samples=4000, train_benchmark=None, reward_weights={"accuracy": 1.0, "format": 1.0}, reward_options={},
        grpo={}, threads=0)),
    "rejection_sample": Kind({"model": "model"}, "dataset", dict(
        model=None, num_prompts=500, k=4, temperature=0.6, top_p=0.95, max_tokens=256, max_per_prompt=2,
        readable=True, max_reasoning_chars=0, fill_with_references=False, threads=0)),
    "sft": Kind({"model": "model", "data": "dataset", "tokenizer": "model"}, "model", dict(
        model=None, data=None, tokenizer=None, model_overrides={}, max_steps=200, batch_size=32,
        learning_rate=1e-3, warmup_steps=10, threads=0)),
    "distill": Kind({"teacher": "model"}, "model", dict(
        teacher=None, student="tiny-dense", student_overrides={}, num_prompts=500, k=4, temperature=0.6,
        top_p=0.95, max_tokens=256, max_per_prompt=2, readable=True, max_reasoning_chars=0,
        fill_with_references=False, max_steps=200,
        batch_size=32, learning_rate=1e-3, warmup_steps=10, threads=0)),
    "eval": Kind({"model": "model"}, "metrics", dict(
        model=None, benchmark=None, num_problems=200, k=4, temperature=0.6, top_p=0.95, max_tokens=256,
        batch_size=256, threads=0)),
}
DENSE_FAMILIES = ("qwen2", "llama")


# ================================================================================ recipes


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file by path, or by name in ./recipes/ or the repository's recipes/ folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidates = [Path("recipes") / f"{name_or_path}.toml", RECIPE_DIR / f"{name_or_path}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted({p.stem for d in (Path("recipes"), RECIPE_DIR) if d.is_dir() for p in d.glob("*.toml")})
    raise FileNotFoundError(f"no recipe {str(name_or_path)!r}: not a file, and not in "
                            f"{', '.join(str(c.parent) for c in candidates)} (recipes there: {', '.join(known) or 'none'})")


def load_recipe(name_or_path: str | Path, overrides: dict | None = None) -> dict:
    """Read and validate a recipe. `overrides`: {stage_name: {key: value}} applied before validation."""
    import tomllib

    path = find_recipe(name_or_path)
    try:
        recipe = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    recipe.setdefault("name", path.stem)
    recipe["source"] = str(path)
    for stage in recipe.get("stages", []):
        stage.update((overrides or {}).get(stage.get("name"), {}))
    return validate(recipe)


def _family_of_preset(name: str, overrides: dict | None = None) -> str | None:
    from r1kit.model.config import PRESETS

    if name in PRESETS:
        return (overrides or {}).get("model_type", PRESETS[name]["model_type"])
    config = Path(name) / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type")
        except json.JSONDecodeError:
            return None
    return None


def validate(recipe: dict) -> dict:
    """Check that the stages chain, before anything runs; return the recipe with defaults filled in.

    Errors name the recipe file, the stage and the key, and say what would fit.
    """
    source = recipe.get("source", "recipe")
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{source}: no [[stages]]; a recipe is a list of [[stages]] tables with name and kind")
    seen: dict[str, dict] = {}
    families: dict[str, str | None] = {}
    out = []
    for i, raw in enumerate(stages):
        where = f"{source}: stage {i + 1}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be a table")
        name, kind_name = raw.get("name"), raw.get("kind")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"{where}: needs a name (a plain folder name), got {name!r}")
        where = f"{source}: stage {name!r}"
        if name in seen:
            raise ValueError(f"{where}: the name is used twice; stage names must be unique")
        if kind_name not in KINDS:
            raise ValueError(f"{where}: unknown kind {kind_name!r}; kinds: {', '.join(KINDS)}")
        kind = KINDS[kind_name]
        allowed = {**COMMON, **kind.defaults}
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} for kind {kind_name!r}; "
                             f"known: {', '.join(sorted(set(allowed) - {'name', 'kind'}))}")
        stage = {**{k: v for k, v in allowed.items()}, **raw}
        # inputs: names of earlier stages producing the right kind of output
        for key, wanted in kind.inputs.items():
            ref = stage.get(key)
            if ref is None:
                if key in ("model", "teacher") or (kind_name == "sft" and key == "data"):
                    raise ValueError(f"{where}: needs {key} = \"<an earlier stage producing a {wanted}>\"")
                continue
            if ref == name:
                raise ValueError(f"{where}: {key} names the stage itself; stages form a chain, not a cycle")
            if ref in seen:
                produced = KINDS[seen[ref]["kind"]].output
                if produced != wanted:
                    raise ValueError(f"{where}: {key} = {ref!r} is a {produced} (stage kind {seen[ref]['kind']!r}); "
                                     f"{key} needs a {wanted}")
                continue
            later = [s.get("name") for s in stages[i + 1:]]
            if ref in later:
                raise ValueError(f"{where}: {key} = {ref!r} runs later in the recipe; a stage can only use "
                                 "earlier stages (reorder the stages)")
            if wanted == "model" and _family_of_preset(ref) is not None:
                continue  # a preset name (fresh weights) or a Hugging Face folder on disk
            raise ValueError(f"{where}: {key} = {ref!r} is no earlier stage (earlier: {', '.join(seen) or 'none'}), "
                             "model preset or model folder")
        if kind_name == "sft" and stage["tokenizer"] is None and stage["model"] not in seen \
                and _family_of_preset(stage["model"]) is not None and not Path(stage["model"]).is_dir():
            raise ValueError(f"{where}: model = {stage['model']!r} is a preset (fresh weights): name the stage "
                             "whose tokenizer it should use with tokenizer = \"<stage>\"")
        # model families, known before running: presets say theirs, trained stages inherit
        family = None
        if kind_name == "pretrain":
            family = _family_of_preset(stage["model"], stage["model_overrides"])
            if family is None:
                raise ValueError(f"{where}: model = {stage['model']!r} is not a model preset")
        elif kind_name == "distill":
            family = _family_of_preset(stage["student"], stage["student_overrides"])
            if family not in DENSE_FAMILIES:
                raise ValueError(f"{where}: student = {stage['student']!r} is a {family or 'unknown'} model; "
                                 f"distillation students are dense ({', '.join(DENSE_FAMILIES)}), e.g. 'tiny-dense'")
        elif "model" in kind.inputs and stage.get("model") is not None:
            ref = stage["model"]
            family = families.get(ref) if ref in seen else _family_of_preset(ref, stage.get("model_overrides"))
        if stage.get("family") is not None:
            src_key = "teacher" if kind_name == "distill" else "model"
            src = stage.get(src_key)
            src_family = families.get(src) if src in seen else _family_of_preset(src or "")
            if src_family is not None and src_family != stage["family"]:
                raise ValueError(f"{where}: expects a {stage['family']} checkpoint, but {src_key} = {src!r} is a "
                                 f"{src_family} model")
        if kind_name == "grpo":
            try:
                grpo_config(stage)
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from None
        if kind_name == "eval" and stage["benchmark"] is None:
            stage["benchmark"] = stage["task"]
        families[name] = family
        seen[name] = stage
        out.append(stage)
    recipe = dict(recipe)
    recipe["stages"] = out
    return recipe


# ================================================================================ running


@dataclass
class Context:
    run_dir: Path
    recipe: dict
    progress: bool = True

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def work_dir(self, name: str) -> Path:
        """Scratch space that survives a crash (trainer checkpoints, evaluation logs): a stage that
        is interrupted picks up its own work from here; it is removed once the stage is done."""
        return self.run_dir / f".{name}.work"

    def stage(self, name: str) -> dict:
        return next(s for s in self.recipe["stages"] if s["name"] == name)

    def model_path(self, ref: str) -> Path | str:
        names = {s["name"] for s in self.recipe["stages"]}
        return self.stage_dir(ref) if ref in names else ref

    def load_model(self, ref: str, expect_family: str | None = None, dtype=None, device=None):
        import r1kit
        import torch

        path = self.model_path(ref)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = r1kit.load(path, dtype=dtype, device=device)
        if expect_family and model.config.model_type != expect_family:
            raise ValueError(f"{path}: a {model.config.model_type} checkpoint, but this stage expects {expect_family}")
        return model, tokenizer


def is_done(stage_dir: Path) -> bool:
    return (stage_dir / DONE).is_file()


def read_done(stage_dir: Path) -> dict:
    try:
        return json.loads((stage_dir / DONE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run(recipe: dict, run_dir: str | Path | None = None, progress: bool = True, only: list[str] | None = None,
        on_stage: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Run the recipe's stages in order, skipping finished ones. Returns {stage: DONE record}."""
    recipe = validate(recipe)
    run_dir = Path(run_dir or Path("runs") / recipe["name"])
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(run_dir, recipe, progress)
    results: dict[str, dict] = {}
    for stage in recipe["stages"]:
        name, out = stage["name"], ctx.stage_dir(stage["name"])
        if is_done(out):
            results[name] = read_done(out)
            _say(progress, f"[stage {name}] done earlier ({results[name].get('seconds', 0):.0f}s) - skipped")
            continue
        if only is not None and name not in only:
            continue
        _say(progress, f"[stage {name}] {stage['kind']} ...")
        threads = stage.get("threads") or 0
        started, cpu_started = time.perf_counter(), time.process_time()
        with _threads(threads):
            with atomic_dir(out) as tmp:
                figures = RUNNERS[stage["kind"]](stage, ctx, tmp) or {}
                record = {"stage": name, "kind": stage["kind"], "seconds": time.perf_counter() - started,
                          "cpu_seconds": time.process_time() - cpu_started,
                          "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
                atomic_write_text(tmp / DONE, json.dumps(record, indent=2, default=str) + "\n")
        shutil.rmtree(ctx.work_dir(name), ignore_errors=True)
        results[name] = record
        _say(progress, f"[stage {name}] finished in {record['seconds']:.0f}s")
        if on_stage is not None:
            on_stage(name, record)
    return results


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


def auto_threads(window_s: float = 1.0) -> int:
    """CPU threads for torch: the cores idle right now, at least one. Oversubscribed OpenMP threads
    spin against each other: on a loaded 2-core machine two threads run ~5x slower than one, while
    on an idle one they run ~1.6x faster. Idleness is sampled from /proc/stat over a short window
    (the load average lags by a minute and counts this very process's earlier work)."""
    import math
    import os
    import time

    cores = os.cpu_count() or 1

    def cpu_times():
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = cpu_times()
        time.sleep(window_s)
        idle1, total1 = cpu_times()
        idle_cores = cores * (idle1 - idle0) / max(total1 - total0, 1e-9)
    except (OSError, ValueError, IndexError):
        try:
            idle_cores = cores - os.getloadavg()[0]
        except OSError:
            idle_cores = cores
    # a core more than three-quarters idle counts as free (short bursts of other work are common)
    return max(1, min(cores, math.ceil(idle_cores - 0.25)))


class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)
        return False


# ================================================================================ data helpers


def task_of(stage: dict):
    from r1kit.tasks import make_task

    return make_task(stage["task"], **stage["task_kwargs"])


def heldout_prompts(stage: dict, ctx: Context) -> set[str]:
    """Prompts of every synthetic eval stage of the recipe: training never sees them."""
    from r1kit.eval import load_samples
    from r1kit.tasks import TASKS

    prompts: set[str] = set()
    for s in ctx.recipe["stages"]:
        if s["kind"] == "eval" and s["benchmark"] in TASKS and s["benchmark"] == stage["task"]:
            prompts |= {x["prompt"] for x in load_samples(s["benchmark"], s["num_problems"], s["task_kwargs"])}
    return prompts


def training_samples(stage: dict, ctx: Context, n: int, seed: int) -> list[dict]:
    """n training problems: from `train_benchmark` (e.g. gsm8k_train) when the stage names one, else
    drawn from the synthetic task, minus every held-out evaluation prompt."""
    if stage.get("train_benchmark"):
        from r1kit.eval import load_samples

        return load_samples(stage["train_benchmark"], limit=n)
    held = heldout_prompts(stage, ctx)
    samples = [s for s in task_of(stage).generate(n + len(held), seed=seed) if s["prompt"] not in held]
    return samples[:n]


def pretraining_corpus(stage: dict, ctx: Context) -> tuple[list[dict], dict]:
    """Prompt + worked solution pairs; `sloppy_fraction` of them by the task's systematic wrong
    solver, so the base can sample right and wrong answers - something for RL to sharpen."""
    samples = training_samples(stage, ctx, stage["num_documents"], seed=stage["seed"])
    return worked_corpus(task_of(stage), samples, stage["num_documents"], stage["sloppy_fraction"], stage["seed"])


# ================================================================================ stage runners


def run_pretrain(stage: dict, ctx: Context, out: Path) -> dict:
    import r1kit
    from r1kit.model import ModelConfig, Transformer
    from r1kit.tokenizer import train_tokenizer

    rows, stats = pretraining_corpus(stage, ctx)
    tokenizer = train_tokenizer([r["prompt"] + r["completion"] for r in rows[:1000]], kind=stage["tokenizer_kind"],
                                vocab_size=None if stage["tokenizer_kind"] == "char" else 1024)
    config = ModelConfig.preset(stage["model"], **{"vocab_size": tokenizer.vocab_size,
                                                   "bos_token_id": tokenizer.bos_token_id,
                                                   "eos_token_id": tokenizer.eos_token_id,
                                                   "pad_token_id": tokenizer.pad_token_id,
                                                   **stage["model_overrides"]})
    import torch

    torch.manual_seed(stage["seed"])
    model = Transformer(config)
    result = _sft(stage, ctx, model, tokenizer, rows, max_steps=stage["max_steps"])
    r1kit.save(result.model, tokenizer, out)
    last = result.metrics[-1] if result.metrics else {}
    return {**stats, "parameters": model.num_parameters(), "model_type": config.model_type,
            "steps": result.steps, "final_loss": last.get("lm_loss"), "loss_curve": _curve(result.metrics)}


def _curve(metrics: list[dict]) -> list[list[float]]:
    return [[m["step"], round(m["lm_loss"], 4)] for m in metrics if "lm_loss" in m]


def _sft(stage: dict, ctx: Context, model, tokenizer, rows: list[dict], max_steps: int):
    from r1kit.train.sft import SFTConfig, train_sft

    config = SFTConfig(mode="sft", template="chat", max_length=512, packing=False,
                       learning_rate=stage["learning_rate"], warmup_steps=stage["warmup_steps"],
                       per_device_train_batch_size=stage["batch_size"], max_steps=max_steps, seed=stage["seed"],
                       output_dir=str(ctx.work_dir(stage["name"]) / "trainer"), save_final=False,
                       save_steps=max(50, max_steps // 4), save_total_limit=1, resume_from_checkpoint="latest",
                       device="cpu" if not _cuda() else "auto", progress=ctx.progress, logging_steps=5)
    return train_sft(config, model=model, tokenizer=tokenizer, train_samples=rows)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_grpo(stage: dict, ctx: Context, out: Path) -> dict:
    import r1kit
    from r1kit import rewards
    from r1kit.train.grpo import prompt_fn_for, train_grpo

    work = ctx.work_dir(stage["name"])
    config = grpo_config(stage, {"progress": ctx.progress, "output_dir": str(work / "trainer")})
    model, tokenizer = ctx.load_model(stage["model"], stage.get("family"), dtype=config.dtype, device=config.device)
    samples = training_samples(stage, ctx, stage["num_train_samples"], seed=stage["seed"] + 1)
    reward_fn = rewards.combine(stage["reward_weights"], stage["reward_options"])
    model.train()
    result = train_grpo(config, model, tokenizer, train_samples=samples, reward_fn=reward_fn,
                        prompt_fn=prompt_fn_for("r1", tokenizer))
    r1kit.save(model, tokenizer, out)
    history = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in result.history]
    atomic_write_text(out / "grpo_metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    src = work / "trainer" / "samples.jsonl"
    if src.is_file():
        shutil.copy(src, out / "grpo_samples.jsonl")
    last = history[-1] if history else {}
    return {"steps": result.steps, "parameters": model.num_parameters(), "model_type": model.config.model_type,
            "final_reward": last.get("reward"), "final_accuracy": last.get("accuracy"),
            "skipped_steps": result.skipped_steps, "reward_errors": result.reward_errors}


def grpo_config(stage: dict, extra: dict | None = None):
    """The stage's `[stages.grpo]` table as a GRPOConfig (TRL's names); unknown keys name the stage."""
    from r1kit.train.grpo import config_from_dict

    table = {"template": "r1", "seed": stage["seed"], **stage["grpo"], **(extra or {})}
    return config_from_dict(table, source=f"stage {stage['name']!r} [stages.grpo]")[0]


def rejection_sample(stage: dict, ctx: Context, model_ref: str, seed_offset: int = 2) -> tuple[list[dict], dict]:
    """Sample `k` completions per training prompt from a model and keep the verified ones: the
    answer is right, the format is R1's, and (readable=True) the thinking is closed and plain -
    R1's filter for cold-start and rejection-sampling data. At most `max_per_prompt` per prompt."""
    from r1kit.engine import Engine, SamplingParams
    from r1kit.eval import build_prompt
    from r1kit.rewards import accuracy_reward, format_reward

    model, tokenizer = ctx.load_model(model_ref)
    samples = training_samples(stage, ctx, stage["num_prompts"], seed=stage["seed"] + seed_offset)
    engine = Engine(model, tokenizer, max_batch_size=256)
    params = SamplingParams(n=stage["k"], max_tokens=stage["max_tokens"], temperature=stage["temperature"],
                            top_p=stage["top_p"], seed=stage["seed"])
    rows, total, correct, references = [], 0, 0, 0
    chunk = max(1, 256 // stage["k"])
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        prompts = [tokenizer.encode(build_prompt(tokenizer, s)) for s in part]
        gens = engine.generate(prompts, params)
        for j, sample in enumerate(part):
            kept = 0
            for g in gens[j * stage["k"]:(j + 1) * stage["k"]]:
                text = g.text if g.text is not None else tokenizer.decode(g.token_ids, skip_special_tokens=True)
                total += 1
                ok = accuracy_reward(text, sample) >= 1.0
                correct += ok
                readable = (not stage["readable"]) or (format_reward(text, sample) >= 1.0 and g.finish_reason == "stop"
                                                       and (not stage["max_reasoning_chars"]
                                                            or len(text) <= stage["max_reasoning_chars"]))
                if ok and readable and kept < stage["max_per_prompt"]:
                    rows.append({"prompt": sample["prompt"], "completion": text})
                    kept += 1
            if not kept and stage["fill_with_references"]:
                # smoke tests only: an untrained teacher verifies nothing, so top up with the task's
                # own correct worked solution to keep the chain testable end to end
                rows.append({"prompt": sample["prompt"],
                             "completion": worked_completion(*task_of(stage).worked_solution(sample, None))})
                references += 1
    if not rows:
        raise ValueError(f"stage {stage['name']!r}: no sampled completion verified ({total} tried); the model "
                         "cannot solve this task yet - train it longer or sample more (k, num_prompts)")
    return rows, {"sampled": total, "verified": correct, "kept": len(rows), "prompts": len(samples),
                  "reference_fills": references}


def run_rejection_sample(stage: dict, ctx: Context, out: Path) -> dict:
    rows, stats = rejection_sample(stage, ctx, stage["model"])
    atomic_write_text(out / "data.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return stats


def _dataset_rows(ctx: Context, ref: str) -> list[dict]:
    path = ctx.stage_dir(ref) / "data.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sft(stage: dict, ctx: Context, out: Path) -> dict:
    import r1kit

    rows = _dataset_rows(ctx, stage["data"])
    names = {s["name"] for s in ctx.recipe["stages"]}
    if stage["model"] in names or Path(stage["model"]).is_dir():
        model, tokenizer = ctx.load_model(stage["model"], stage.get("family"))
    else:  # a preset: fresh weights, the named stage's tokenizer
        from r1kit.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(ctx.model_path(stage["tokenizer"]))
        model = fresh_model(stage["model"], tokenizer, stage["model_overrides"], stage["seed"])
    result = _sft(stage, ctx, model, tokenizer, rows, max_steps=stage["max_steps"])
    r1kit.save(result.model, tokenizer, out)
    return {"examples": len(rows), "steps": result.steps, "parameters": model.num_parameters(),
            "loss_curve": _curve(result.metrics)}


def fresh_model(preset: str, tokenizer, overrides: dict, seed: int):
    """A preset with fresh weights, sized to `tokenizer` (its vocabulary and special ids)."""
    import torch
    from r1kit.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size,
                                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                          pad_token_id=tokenizer.pad_token_id, **overrides))


def run_distill(stage: dict, ctx: Context, out: Path) -> dict:
    """R1's distillation: SFT only, a smaller dense student on the teacher's verified samples."""
    import r1kit

    rows, stats = rejection_sample(stage, ctx, stage["teacher"])
    _, tokenizer = ctx.load_model(stage["teacher"])
    student = fresh_model(stage["student"], tokenizer, stage["student_overrides"], stage["seed"])
    result = _sft(stage, ctx, student, tokenizer, rows, max_steps=stage["max_steps"])
    r1kit.save(result.model, tokenizer, out)
    atomic_write_text(out / "distill_data.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {**stats, "student": stage["student"], "parameters": student.num_parameters(), "steps": result.steps,
            "loss_curve": _curve(result.metrics)}


def run_eval(stage: dict, ctx: Context, out: Path) -> dict:
    from r1kit.eval import evaluate, load_samples, public_summary

    samples = load_samples(stage["benchmark"], stage["num_problems"], stage["task_kwargs"])
    model, tokenizer = ctx.load_model(stage["model"], stage.get("family"))
    work = ctx.work_dir(stage["name"])
    work.mkdir(parents=True, exist_ok=True)
    from r1kit.engine import Engine

    engine = Engine(model, tokenizer, max_batch_size=stage["batch_size"])
    summary = evaluate(model, tokenizer, samples, k=stage["k"], temperature=stage["temperature"], top_p=stage["top_p"],
                       max_tokens=stage["max_tokens"], out=work / "completions.jsonl", engine=engine,
                       benchmark=str(stage["benchmark"]), batch_size=stage["batch_size"], seed=stage["seed"],
                       progress=ctx.progress)
    shutil.copy(work / "completions.jsonl", out / "completions.jsonl")
    figures = public_summary(summary)
    figures.pop("log", None)
    figures["model"] = stage["model"]
    atomic_write_text(out / "summary.json", json.dumps(figures, indent=2) + "\n")
    return figures


RUNNERS = {"pretrain": run_pretrain, "grpo": run_grpo, "rejection_sample": run_rejection_sample, "sft": run_sft,
           "distill": run_distill, "eval": run_eval}


# ================================================================================ command line


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="a recipe file (recipes/*.toml) or its name, e.g. r1-pipeline-tiny")
    parser.add_argument("--run-dir", default=None, help="where stages are written (default: runs/<recipe name>)")
    parser.add_argument("--check", action="store_true", help="only validate the recipe's chain of stages")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: the idle cores)")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    recipe = load_recipe(args.recipe)
    if args.check:
        for s in recipe["stages"]:
            inputs = {k: s[k] for k in KINDS[s["kind"]].inputs if s.get(k)}
            print(f"{s['name']:<16} {s['kind']:<17} {inputs}")
        print(f"{recipe['source']}: {len(recipe['stages'])} stages chain correctly")
        return 0
    import torch

    torch.set_num_threads(args.threads or auto_threads())
    results = run(recipe, args.run_dir, progress=not args.no_progress)
    run_dir = Path(args.run_dir or Path("runs") / recipe["name"])
    total = sum(r.get("seconds", 0) for r in results.values())
    for name, r in results.items():
        extra = f" pass@1 {r['pass1']:.1f}%" if "pass1" in r else ""
        print(f"{name:<16} {r.get('kind', ''):<17} {r.get('seconds', 0):7.1f}s{extra}")
    print(f"all stages done in {run_dir} ({total / 60:.1f} min of stage time)")
    return 0
