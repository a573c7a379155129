"""Supervised training: causal-LM pretraining and SFT, on one process or under torchrun.

The loop, top to bottom: build the tokenizer, data and model; wrap the model for DDP/FSDP when
launched by torchrun; then for each step take the step's global batch (a pure function of seed and
step), split it into this rank's micro-batches, accumulate gradients, clip, AdamW, LR schedule,
MoE bias update; log, evaluate and checkpoint on schedule.

The loss of a step is the token-weighted mean over the whole global batch: each micro-batch's
mean loss is weighted by its share of the global batch's target tokens (and its share of the
sequences for the per-sequence MoE balance term). Every rank knows the whole global batch, so the
weights need no communication, and N ranks reproduce one process over the same global batch.

    from r1kit.train.sft import SFTConfig, train_sft
    result = train_sft(SFTConfig(model="tiny", mode="pretrain", max_steps=200), train_samples=texts)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from r1kit import data as D
from r1kit.allocator import keep_freed_memory
from r1kit.checkpoint import atomic_write_text
from r1kit.model import precision
from r1kit.train import distributed as dist_
from r1kit.train import trainer_state as ts
from r1kit.train.optim import adamw, clip_grad_norm


@dataclass
class SFTConfig:
    """Every key of a `r1kit train sft|pretrain` recipe. Names follow TRL's SFTConfig."""

    # --- what to train
    mode: str = "sft"  # "sft": loss on completions | "pretrain": loss on every token
    model: str = "tiny"  # a preset name (fresh weights) or a Hugging Face folder
    model_overrides: dict = field(default_factory=dict)  # preset fields to change, e.g. {num_hidden_layers = 2}
    tokenizer: str = ""  # a tokenizer folder; default: the model folder's, or a new byte-level one for a preset
    # --- data
    train_files: list[str] = field(default_factory=list)  # JSON lines: text / prompt+completion / messages
    eval_files: list[str] = field(default_factory=list)
    eval_fraction: float = 0.0  # hold out this share of the training rows when there are no eval_files
    template: str = "auto"  # prompt rendering: auto (chat template if any) | chat | r1zero | none
    max_length: int = 512
    packing: bool | str = "auto"  # auto: on for pretraining, off for SFT
    completion_only_loss: bool = True
    skip_bad_rows: bool = False
    # --- optimisation
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at learning_rate * min_lr_ratio
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    seed: int = 42
    # --- precision, memory, scale
    bf16: bool | str = "auto"  # auto: bf16 autocast on GPUs that support it, bf16 products on CPUs with AMX
    # for models 256+ wide (r1kit.model.precision); True: also on any CPU
    gradient_checkpointing: bool = False
    compile: bool | str = False  # torch.compile the training forward (True: inductor; a string: that backend)
    device: str = "auto"
    distributed: str = "auto"  # auto (DDP under torchrun) | ddp | fsdp | none
    torch_threads: int = 0  # 0: torch's default
    # --- evaluation, logging, checkpoints
    eval_steps: int = 0  # 0: evaluate at the start and the end only
    per_device_eval_batch_size: int = 0  # 0: the training micro-batch size
    logging_steps: int = 1
    save_steps: int = 0  # 0: save at the end only
    save_total_limit: int = 2  # keep the newest N checkpoints (0 keeps all)
    save_final: bool = True  # also write output_dir/final (a plain HF folder)
    output_dir: str = "runs/sft"
    resume_from_checkpoint: str = ""  # "latest" or a checkpoint folder
    overwrite_output_dir: bool = False
    progress: bool = True
    check_memory: bool = True  # on a GPU, stop before training when `r1kit plan` says it will not fit

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.mode in ("sft", "pretrain"), f"mode must be 'sft' or 'pretrain', got {self.mode!r}")
        need(self.template in D.TEMPLATES, f"template must be one of {', '.join(D.TEMPLATES)}, got {self.template!r}")
        need(self.packing in (True, False, "auto"), f"packing must be true, false or 'auto', got {self.packing!r}")
        need(self.bf16 in (True, False, "auto"), f"bf16 must be true, false or 'auto', got {self.bf16!r}")
        need(self.lr_scheduler_type in ("cosine", "linear", "constant"),
             f"lr_scheduler_type must be cosine, linear or constant, got {self.lr_scheduler_type!r}")
        need(self.distributed in dist_.MODES, f"distributed must be one of {', '.join(dist_.MODES)}")
        need(self.max_length >= 2, "max_length must be at least 2")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1")
        need(0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)")

    @property
    def use_packing(self) -> bool:
        return self.mode == "pretrain" if self.packing == "auto" else bool(self.packing)


@dataclass
class TrainResult:
    model: Any  # the trained Transformer (sharded in place under FSDP)
    tokenizer: Any
    output_dir: Path
    final_path: Path | None  # output_dir/final, a plain HF folder (rank 0 writes it)
    checkpoint: Path | None  # the last checkpoint written
    steps: int
    metrics: list[dict]  # every logged record (rank 0; empty elsewhere)
    eval_losses: list[tuple[int, float]]  # (step, held-out loss)
    data_stats: dict


# ---------------------------------------------------------------------------- building blocks


def lr_lambda(config: SFTConfig, total_steps: int):
    warmup = config.warmup_steps or int(round(config.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler_type == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.lr_scheduler_type == "cosine" else 1 - progress
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape

    return factor


def build_optimizer(model: torch.nn.Module, config: SFTConfig) -> torch.optim.Optimizer:
    # no weight decay on norms and biases (1-D), as everyone does
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                 eps=config.adam_epsilon)


def _texts_of(rows: list) -> list[str]:
    out = []
    for r in rows:
        if isinstance(r, str):
            out.append(r)
        elif "text" in r:
            out.append(r["text"])
        elif "messages" in r:
            out.extend(m["content"] for m in r["messages"])
        else:
            out.extend((r["prompt"], r["completion"]))
    return out


def resolve_tokenizer(config: SFTConfig, rows: list, resume: Path | None):
    from r1kit.model.config import PRESETS
    from r1kit.tokenizer import Tokenizer, train_tokenizer

    if resume is not None and (resume / "tokenizer.json").is_file():
        return Tokenizer.from_folder(resume)
    if config.tokenizer:
        return Tokenizer.from_folder(config.tokenizer)
    if config.model not in PRESETS:
        return Tokenizer.from_folder(config.model)
    # a fresh preset with no tokenizer: one token per byte plus the R1 special tokens
    return train_tokenizer(_texts_of(rows), kind="char")


def resolve_model_config(config: SFTConfig, tokenizer):
    from r1kit.model import ModelConfig
    from r1kit.model.config import PRESETS

    if config.model in PRESETS:
        values = dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        values.update(config.model_overrides)
        return ModelConfig.preset(config.model, **values)
    if config.model_overrides:
        raise ValueError("model_overrides applies to presets only; a model folder keeps its config.json")
    model_config = ModelConfig.from_file(config.model)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but {config.model} embeds only "
                         f"{model_config.vocab_size}; use the model's own tokenizer")
    return model_config


def load_data(config: SFTConfig, train_samples, eval_samples, stats: D.DataStats):
    if train_samples is not None:
        rows = D.check_rows(train_samples, "train_samples", config.skip_bad_rows, stats)
    else:
        if not config.train_files:
            raise ValueError("no training data: set train_files = [\"data.jsonl\"] in the recipe "
                             "(or pass train_samples to train_sft)")
        rows = [r for f in config.train_files for r in D.read_jsonl(f, config.skip_bad_rows, stats)]
    if eval_samples is not None:
        eval_rows = D.check_rows(eval_samples, "eval_samples", config.skip_bad_rows, stats)
    elif config.eval_files:
        eval_rows = [r for f in config.eval_files for r in D.read_jsonl(f, config.skip_bad_rows, stats)]
    else:
        rows, eval_rows = D.split_holdout(rows, config.eval_fraction, config.seed)
    return rows, eval_rows


class Logger:
    """metrics.jsonl (appended and flushed per record) and a rich progress bar; rank 0 only."""

    def __init__(self, output_dir: Path, enabled: bool, total: int, start: int, progress: bool):
        self.enabled = enabled
        self.records: list[dict] = []
        self.path = output_dir / "metrics.jsonl"
        self.bar = None
        if not enabled:
            return
        if self.path.exists():
            # a resumed run recomputes the steps after its checkpoint exactly, so their old records go
            # (and a line cut short by the crash); a fresh run starts an empty file
            kept = []
            for ln in self.path.read_text().splitlines() if start > 0 else []:
                try:
                    if json.loads(ln).get("step", 0) <= start:
                        kept.append(ln)
                except json.JSONDecodeError:
                    pass
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        self.file = self.path.open("a", encoding="utf-8")
        if progress:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, rate="", info="")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None and "loss" in record:
            self.bar.update(self.task, completed=record["step"],
                            rate=f"{record['steps_per_second']:.2f} step/s {record['tokens_per_second']:.0f} tok/s",
                            info=f"loss {record['loss']:.4f}")

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.stop()
            self.file.close()


# ---------------------------------------------------------------------------- the loop


def _counts(ex_list: list[D.Example], has_mtp: bool) -> tuple[int, int, int]:
    """(targets of the next-token loss, targets of the depth-1 MTP loss, sequences)."""
    n_lm = sum(sum(ex.loss_mask[1:]) for ex in ex_list)
    n_mtp = sum(sum(ex.loss_mask[2:]) for ex in ex_list) if has_mtp else 0
    return n_lm, n_mtp, len(ex_list)


def evaluate(wrapped, examples: list[D.Example], batch_size: int, info: dist_.DistInfo, pad_id: int,
             autocast) -> float:
    """Held-out next-token loss, token-weighted over all of `examples` (all ranks call it; under FSDP
    every rank must run the same number of forwards, so the set is padded with empty rows)."""
    chunk = batch_size * info.world_size
    padded = examples + [D.Example([pad_id, pad_id], [0, 0])] * (-len(examples) % chunk)
    loss_sum = torch.zeros(2, dtype=torch.float64)
    wrapped.eval()
    with torch.no_grad():
        for start in range(0, len(padded), chunk):
            part = padded[start + info.rank * batch_size:start + (info.rank + 1) * batch_size]
            length = max(len(ex.input_ids) for ex in padded[start:start + chunk])
            ids, mask = D.collate(part, length, pad_id)
            with autocast():
                out = wrapped(ids.to(info.device), mask.to(info.device))
            n = float(mask[:, 1:].sum())
            loss_sum += torch.tensor([float(out["lm_loss"]) * n, n], dtype=torch.float64)
    wrapped.train()
    dist_.all_reduce_sum(loss_sum)
    return float(loss_sum[0] / loss_sum[1].clamp_min(1))


def train_sft(config: SFTConfig, model=None, tokenizer=None, train_samples=None, eval_samples=None) -> TrainResult:
    """Train per `config`. `model` / `tokenizer` / `train_samples` / `eval_samples` (in-memory rows:
    strings, {"text"}, {"prompt","completion"} or {"messages"}) replace what the config would load."""
    from r1kit.model import Transformer
    from r1kit.model.hf import load_model

    info = dist_.setup(config.device)
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    output_dir = Path(config.output_dir)
    resume = ts.resolve_resume(config.resume_from_checkpoint, output_dir)
    if resume is None and ts.list_checkpoints(output_dir) and not config.overwrite_output_dir:
        raise ValueError(f"{output_dir} already holds checkpoints of a run; continue it with --resume, or choose "
                         "another output_dir (overwrite_output_dir=true starts over and replaces them one by one)")
    main = info.is_main

    # --- data and tokenizer
    stats = D.DataStats()
    rows, eval_rows = load_data(config, train_samples, eval_samples, stats)
    if tokenizer is None:
        tokenizer = resolve_tokenizer(config, rows, resume)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encode = dict(tokenizer=tokenizer, mode=config.mode, template=config.template, max_length=config.max_length,
                  packing=config.use_packing, completion_only_loss=config.completion_only_loss)
    train_ex = D.encode_rows(rows, stats=stats, **encode)
    eval_ex = D.encode_rows(eval_rows, **encode) if eval_rows else []
    if main and stats.bad_rows:
        print(f"skipped {stats.bad_rows} malformed rows (first: {stats.bad_examples[0]})", file=sys.stderr)
    mb, accum = config.per_device_train_batch_size, config.gradient_accumulation_steps
    global_batch = mb * accum * info.world_size
    per_epoch = D.steps_per_epoch(len(train_ex), global_batch)
    if per_epoch == 0:
        if stats.dropped:
            raise ValueError(f"{stats.dropped} of {stats.rows} training examples were dropped because their prompt "
                             f"alone fills max_length={config.max_length} tokens; raise max_length")
        D.batch_indices(len(train_ex), global_batch, 0, config.seed)  # raises the explanatory error
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.num_train_epochs * per_epoch))
    data_id = D.fingerprint(train_ex)

    # --- model
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if model is None:
        model_config = resolve_model_config(config, tokenizer)
        if resume is not None:
            ts.check_same_model(resume, model_config)
            model = load_model(resume, device=info.device)
        elif config.model in _presets():
            model = Transformer(model_config).to(info.device)
        else:
            model = load_model(config.model, device=info.device)
    elif resume is not None:
        ts.check_same_model(resume, model.config)
        model.load_state_dict(load_model(resume).state_dict())
    model.to(info.device).train()
    if torch.device(info.device).type == "cpu":  # every step frees and retakes the same buffers (allocator.py)
        keep_freed_memory()
    model.gradient_checkpointing = config.gradient_checkpointing
    has_mtp = len(getattr(model, "mtp", [])) > 0
    mtp_weight = model.config.mtp_loss_weight
    if config.check_memory and info.device.type == "cuda":
        preflight(model, config, info)
    wrapped, mode = dist_.wrap(model, info, config.distributed)
    if config.compile:  # after wrapping: DDP/FSDP hooks stay outside the compiled graphs
        wrapped = torch.compile(wrapped, backend=config.compile if isinstance(config.compile, str) else "inductor")
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    use_bf16 = config.bf16 is True or (config.bf16 == "auto" and info.device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    # on a CPU not autocast (it recasts every weight at every forward, and runs attention in bf16, whose
    # backward is slow there) but bf16 products in the linear layers only, where AMX makes them pay
    cpu_bf16 = precision.wanted(config.bf16, info.device, getattr(getattr(model, "config", None), "hidden_size", None))
    if use_bf16 and info.device.type != "cuda":
        use_bf16 = False

    def autocast():
        if cpu_bf16:
            return precision.bf16_matmuls()
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=info.device.type, dtype=torch.bfloat16)

    # --- resume
    start_step = 0
    if resume is not None:
        state = ts.load_trainer_state(resume)
        for key, now in (("data_fingerprint", data_id), ("global_batch_size", global_batch),
                         ("seed", config.seed)):
            if state.get(key) != now:
                raise ValueError(f"{resume}: the checkpoint was written with {key}={state.get(key)!r}, this run "
                                 f"has {now!r}; an exact resume needs the same data, global batch and seed")
        dist_.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        ts.set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
        start_step = int(state["step"])
        if main:
            print(f"resumed from {resume} at step {start_step}", file=sys.stderr)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        from r1kit.train.config import to_toml

        atomic_write_text(output_dir / "recipe.toml", to_toml(config))
    dist_.barrier()

    logger = Logger(output_dir, main, total_steps, start_step, config.progress)
    eval_bs = config.per_device_eval_batch_size or mb
    eval_losses: list[tuple[int, float]] = []

    def run_eval(step: int) -> None:
        if not eval_ex:
            return
        loss = evaluate(wrapped, eval_ex, eval_bs, info, pad_id, autocast)
        eval_losses.append((step, loss))
        logger.log({"step": step, "eval_loss": loss})

    last_checkpoint: Path | None = None

    def save(step: int) -> Path:
        # every rank takes part in gathering the state; rank 0 writes
        full = dist_.full_model_state(model, mode)
        optim_state = dist_.full_optimizer_state(model, optimizer)
        rngs = dist_.all_gather_object(ts.rng_state())
        path = output_dir / ts.checkpoint_name(step)
        if main:
            to_save = model if mode != "fsdp" else dist_.cpu_model(model.config, full)
            record = {"step": step, "epoch": step / per_epoch, "examples_seen": step * global_batch,
                      "data_fingerprint": data_id, "global_batch_size": global_batch, "seed": config.seed,
                      "world_size": info.world_size, "total_steps": total_steps,
                      "last_metrics": logger.records[-1] if logger.records else None,
                      "recipe": {k: v for k, v in config.__dict__.items()}}
            ts.save_checkpoint(output_dir, step, to_save, tokenizer, optim_state, scheduler.state_dict(), rngs, record)
            ts.rotate(output_dir, config.save_total_limit)
        dist_.barrier()
        return path

    if start_step == 0:
        run_eval(0)
    t_last, steps_since = time.perf_counter(), 0
    tokens_since = 0
    for step in range(start_step, total_steps):
        indices = D.batch_indices(len(train_ex), global_batch, step, config.seed)
        batch = [train_ex[i] for i in indices]
        length = max(len(ex.input_ids) for ex in batch)  # one padded length for the whole global batch
        n_lm, n_mtp, n_seq = _counts(batch, has_mtp)
        mine = batch[info.rank * mb * accum:(info.rank + 1) * mb * accum]
        sums = torch.zeros(4, dtype=torch.float64)  # loss, lm, mtp, aux (weighted, this rank's share)
        for micro in range(accum):
            part = mine[micro * mb:(micro + 1) * mb]
            ids, mask = D.collate(part, length, pad_id)
            c_lm, c_mtp, c_seq = _counts(part, has_mtp)
            w_lm, w_mtp, w_seq = c_lm / max(n_lm, 1), c_mtp / max(n_mtp, 1), c_seq / n_seq
            with dist_.no_sync(wrapped, mode, micro == accum - 1), autocast():
                out = wrapped(ids.to(info.device), mask.to(info.device))
                loss = out["lm_loss"] * w_lm + out["aux_loss"] * w_seq
                if has_mtp:
                    loss = loss + mtp_weight * out["mtp_loss"] * w_mtp
                # ranks' gradients are averaged (DDP/FSDP); the weights already sum to one globally
                (loss * info.world_size).backward()
            parts = [loss, out["lm_loss"] * w_lm, out["mtp_loss"] * w_mtp, out["aux_loss"] * w_seq]
            sums += torch.tensor([float(p.detach()) for p in parts], dtype=torch.float64)
        dist_.all_reduce_sum(sums)
        clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = clip_grad_norm(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_router_bias()
        done = step + 1
        steps_since += 1
        tokens_since += sum(len(ex.input_ids) for ex in batch)
        if done % config.logging_steps == 0 or done == total_steps:
            now = time.perf_counter()
            elapsed = max(now - t_last, 1e-9)
            logger.log({"step": done, "epoch": round(done / per_epoch, 4), "loss": float(sums[0]),
                        "lm_loss": float(sums[1]), "mtp_loss": float(sums[2]), "aux_loss": float(sums[3]),
                        "grad_norm": float(grad_norm), "learning_rate": lr, "target_tokens": n_lm,
                        "steps_per_second": steps_since / elapsed, "tokens_per_second": tokens_since / elapsed})
            t_last, steps_since, tokens_since = now, 0, 0
        if (config.eval_steps and done % config.eval_steps == 0) or done == total_steps:
            run_eval(done)
        if (config.save_steps and done % config.save_steps == 0) or done == total_steps:
            last_checkpoint = save(done)
        ts._test_kill("R1KIT_TEST_KILL_AFTER_STEP", done)
    logger.close()

    final_path = None
    if config.save_final:
        final_path = output_dir / "final"
        full = dist_.full_model_state(model, mode) if mode == "fsdp" else None
        if main:
            from r1kit.model.hf import save as save_hf

            save_hf(model if mode != "fsdp" else dist_.cpu_model(model.config, full), tokenizer, final_path)
        dist_.barrier()
    if main:
        atomic_write_text(output_dir / "data_stats.json", json.dumps(stats.as_dict(), indent=2))
    return TrainResult(model=model, tokenizer=tokenizer, output_dir=output_dir, final_path=final_path,
                       checkpoint=last_checkpoint, steps=total_steps, metrics=logger.records,
                       eval_losses=eval_losses, data_stats=stats.as_dict())


def preflight(model, config: SFTConfig, info: dist_.DistInfo) -> None:
    """The `r1kit plan` estimate against this GPU's free memory, before the first step allocates."""
    from r1kit.train.plan import GiB, device_memory, estimate

    sharded = dist_.resolve_mode(config.distributed, info) == "fsdp"
    plan = estimate(model.config, micro_batch=config.per_device_train_batch_size, seq_len=config.max_length,
                    world_size=info.world_size, sharded=sharded, gradient_checkpointing=config.gradient_checkpointing,
                    act_bytes=2 if config.bf16 is not False else 4, parameters=model.num_parameters())
    # the weights are already on the device, so they count as used memory, not as needed memory
    free, where = device_memory()
    needed = plan.total - plan.weights
    if free is not None and needed > free:
        raise ValueError(f"this run needs about {plan.total / GiB:.1f} GiB per device ({where}): it would run out of "
                         "memory. See `r1kit plan --config ...`; try distributed=fsdp, gradient_checkpointing=true or "
                         "a smaller per_device_train_batch_size / max_length (check_memory=false to try anyway)")


def _presets():
    from r1kit.model.config import PRESETS

    return PRESETS


# ---------------------------------------------------------------------------- command line


def main_from_config(config: SFTConfig) -> int:
    """Train, print a one-line JSON summary (rank 0), leave the process group."""
    try:
        result = train_sft(config)
        if int(os.environ.get("RANK", 0)) == 0:
            summary = {"steps": result.steps, "output_dir": str(result.output_dir),
                       "final": str(result.final_path) if result.final_path else None,
                       "checkpoint": str(result.checkpoint) if result.checkpoint else None}
            if result.eval_losses:
                summary.update(eval_loss_start=result.eval_losses[0][1], eval_loss_end=result.eval_losses[-1][1])
            losses = [r["loss"] for r in result.metrics if "loss" in r]
            if losses:
                summary["train_loss_end"] = losses[-1]
            print(json.dumps(summary))
    finally:
        dist_.cleanup()
    return 0
