"""Training data for the supervised trainer: read rows, render and tokenize them, pack, batch.

Three row forms (JSON lines, or dicts in memory):
    {"text": "..."}                                  plain text: loss on every token (pretraining)
    {"prompt": "...", "completion": "..."}           SFT pair: loss on the completion only
    {"messages": [{"role": ..., "content": ...}]}    chat: loss on the last assistant turn only

A prompt is rendered the way generation will see it (`template`): the tokenizer's chat template
with its generation prompt (for R1, `<｜Assistant｜><think>\\n`, so the completion starts inside
the reasoning), the R1-Zero prompt, or the bare text. Prompt and completion are tokenized apart
and joined, so the completion's first token is exactly what the model must produce after the
prompt at inference time.

Batches are a pure function of (seed, step): each epoch is a fresh permutation seeded by
(seed, epoch), and step s takes the s-th slice of it. That makes a resumed run read exactly the
rows the uninterrupted run would have read, with nothing to save but the step.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

TEMPLATES = ("auto", "chat", "r1zero", "none")


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target


@dataclass
class DataStats:
    rows: int = 0
    bad_rows: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to learn after truncation (the prompt alone fills max_length)
    tokens: int = 0
    target_tokens: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["bad_examples"] = d["bad_examples"][:5]
        return d


# ---------------------------------------------------------------------------- reading rows


def row_error(row: Any) -> str | None:
    """Why `row` is not a training row, or None when it is one."""
    if isinstance(row, str):
        return None
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "text" in row:
        return None if isinstance(row["text"], str) else "'text' must be a string"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be {{'role': str, 'content': str}}"
        if msgs[-1]["role"] != "assistant":
            return "the last message must be the assistant's (it is what the model learns to write)"
        return None
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            return "'prompt' must be a string"
        if "completion" not in row:
            return ("has a 'prompt' but no 'completion' (a task sample is for RL and evaluation; SFT needs "
                    "the text to learn: add 'completion')")
        return None if isinstance(row["completion"], str) else "'completion' must be a string"
    return "needs 'text', 'prompt' + 'completion', or 'messages'"


def read_jsonl(path: str | Path, skip_bad_rows: bool = False, stats: DataStats | None = None) -> list[dict]:
    """Rows of a JSON-lines file; a malformed row is an error naming file and line, or is skipped
    and counted with skip_bad_rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} not found")
    stats = stats if stats is not None else DataStats()
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                err = row_error(row)
            except json.JSONDecodeError as e:
                err = f"not valid JSON ({e.msg} at column {e.colno})"
            if err is not None:
                where = f"{path}:{line_no}: {err}"
                if not skip_bad_rows:
                    raise ValueError(f"{where}; fix the row, or pass --skip-bad-rows to skip and count such rows")
                stats.bad_rows += 1
                stats.bad_examples.append(where)
                continue
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no usable rows")
    return rows


def check_rows(rows: Iterable[Any], source: str = "train_samples", skip_bad_rows: bool = False,
               stats: DataStats | None = None) -> list:
    out = []
    for i, row in enumerate(rows):
        err = row_error(row)
        if err is not None:
            if not skip_bad_rows:
                raise ValueError(f"{source}[{i}]: {err}")
            if stats is not None:
                stats.bad_rows += 1
                stats.bad_examples.append(f"{source}[{i}]: {err}")
            continue
        out.append(row)
    return out


# ---------------------------------------------------------------------------- rendering


def render_prompt(tokenizer, prompt: str | list[dict], template: str = "auto") -> tuple[str, bool]:
    """(prompt text, whether the text already carries its special tokens)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if isinstance(prompt, list) or template == "chat" or (template == "auto" and tokenizer.chat_template):
        from r1kit.tokenizer import R1_CHAT_TEMPLATE

        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             chat_template=tokenizer.chat_template or R1_CHAT_TEMPLATE)
        return text, True
    if template == "r1zero":
        from r1kit.tokenizer import r1zero_prompt

        return r1zero_prompt(prompt), False
    return prompt, False


def encode_row(row: dict | str, tokenizer, template: str = "auto", completion_only_loss: bool = True) -> Example:
    if isinstance(row, str):
        row = {"text": row}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in row:
        ids = tokenizer.encode(row["text"], add_special_tokens=True) + eos
        return Example(ids, [1] * len(ids))
    if "messages" in row:
        prompt_text, has_special = render_prompt(tokenizer, row["messages"][:-1], template)
        completion = row["messages"][-1]["content"]
    else:
        prompt_text, has_special = render_prompt(tokenizer, row["prompt"], template)
        completion = row["completion"]
    if prompt_text.endswith("<think>\n"):  # the generation prompt already opened the reasoning
        completion = completion.removeprefix("<think>\n").removeprefix("<think>")
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=not has_special)
    completion_ids = tokenizer.encode(completion) + eos
    mask = [0 if completion_only_loss else 1] * len(prompt_ids) + [1] * len(completion_ids)
    return Example(prompt_ids + completion_ids, mask)


def encode_rows(rows: list, tokenizer, mode: str, template: str, max_length: int, packing: bool,
                completion_only_loss: bool = True, stats: DataStats | None = None) -> list[Example]:
    """Rows -> training examples of at most max_length tokens (packed when asked)."""
    stats = stats if stats is not None else DataStats()
    examples = []
    for row in rows:
        ex = encode_row(row, tokenizer, template, completion_only_loss and mode == "sft")
        stats.rows += 1
        examples.append(ex)
    if mode == "pretrain" and packing:
        examples = pack_stream(examples, max_length)
    else:
        kept = []
        for ex in examples:
            if len(ex.input_ids) > max_length:
                stats.truncated += 1
                ex = Example(ex.input_ids[:max_length], ex.loss_mask[:max_length])
            if sum(ex.loss_mask[1:]) == 0:
                stats.dropped += 1
                continue
            kept.append(ex)
        examples = pack_greedy(kept, max_length) if packing else kept
    for ex in examples:
        stats.tokens += len(ex.input_ids)
        stats.target_tokens += sum(ex.loss_mask[1:])
    return examples


# ---------------------------------------------------------------------------- packing


def pack_stream(examples: list[Example], max_length: int) -> list[Example]:
    """Pretraining: one token stream cut into rows of max_length (documents end in eos)."""
    ids = [t for ex in examples for t in ex.input_ids]
    mask = [m for ex in examples for m in ex.loss_mask]
    rows = [Example(ids[i:i + max_length], mask[i:i + max_length]) for i in range(0, len(ids), max_length)]
    return [r for r in rows if len(r.input_ids) >= 2]


def pack_greedy(examples: list[Example], max_length: int) -> list[Example]:
    """SFT: whole examples laid end to end into rows of at most max_length, in order. Examples in
    one row can attend to earlier ones (no per-document mask), the usual price of packing."""
    rows, ids, mask = [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_length:
            rows.append(Example(ids, mask))
            ids, mask = [], []
        ids = ids + ex.input_ids
        mask = mask + ex.loss_mask
    if ids:
        rows.append(Example(ids, mask))
    return rows


# ---------------------------------------------------------------------------- batching


def steps_per_epoch(n_examples: int, global_batch_size: int) -> int:
    return n_examples // global_batch_size


def batch_indices(n_examples: int, global_batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of global step `step`: a pure function of (seed, step). The last partial batch
    of an epoch is dropped so that every step (and every rank's share of it) has the same size."""
    per_epoch = steps_per_epoch(n_examples, global_batch_size)
    if per_epoch == 0:
        raise ValueError(f"{n_examples} training examples cannot fill one global batch of {global_batch_size} "
                         "(per_device_train_batch_size x gradient_accumulation_steps x world size): "
                         "add data or lower the batch size")
    epoch, index = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_examples, generator=generator)
    return order[index * global_batch_size:(index + 1) * global_batch_size].tolist()


def collate(examples: list[Example], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to `length` -> input_ids (B, length) long, loss_mask (B, length) long."""
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[i, :n] = torch.tensor(ex.loss_mask, dtype=torch.long)
    return ids, mask


def fingerprint(examples: list[Example]) -> str:
    """A hash of the tokenized data, saved in checkpoints: resuming on other data is an error."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(len(ex.input_ids).to_bytes(4, "little"))
        h.update(torch.tensor(ex.input_ids, dtype=torch.int64).numpy().tobytes())
        h.update(bytes(ex.loss_mask))
    return h.hexdigest()[:16]


def split_holdout(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """A fixed random `fraction` of rows held out for evaluation (at least one when fraction > 0)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 7)).tolist()
    n_eval = max(1, int(round(len(rows) * fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
