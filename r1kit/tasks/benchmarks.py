"""Loaders: the benchmark files in the shared data folder, any JSONL with a field mapping, and HF
`datasets` (optional: only when installed and online). All yield Samples; every error names the
file, the line and the field."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterator

from r1kit.paths import benchmarks_dir
from r1kit.tasks.base import make_sample

# name -> (file, format)
BENCHMARKS = {
    "aime24": ("aime24.jsonl", "math"),
    "aime25": ("aime25.jsonl", "math"),
    "hmmt25": ("hmmt25.jsonl", "math"),
    "math500": ("math500.jsonl", "math"),
    "gsm8k": ("gsm8k_test.jsonl", "gsm8k"),
    "gsm8k_train": ("gsm8k_train.jsonl", "gsm8k"),
    "gpqa": ("gpqa_diamond.jsonl", "gpqa"),
    "humaneval": ("HumanEval.jsonl.gz", "humaneval"),
}


def read_jsonl(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line; .gz read transparently."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row
            count += 1
            if limit is not None and count >= limit:
                return


def _field(row: dict, name: str, where: str, kinds=(str,)) -> Any:
    if name not in row:
        raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
    value = row[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} must be {'/'.join(k.__name__ for k in kinds)}, "
                         f"got {type(value).__name__}")
    return value


def gsm8k_answer(solution: str) -> str | None:
    """The number after '#### ' in a GSM8K solution, commas removed."""
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", solution)
    return m.group(1).replace(",", "") if m else None


def _math(row, where, name):
    answer = _field(row, "answer", where, (str, int, float))
    return make_sample(_field(row, "prompt", where), str(answer), "math", source=name)


def _gsm8k(row, where, name):
    solution = _field(row, "answer", where)
    answer = gsm8k_answer(solution)
    if answer is None:
        raise ValueError(f"{where}: field 'answer' has no '#### N' final answer")
    return make_sample(_field(row, "question", where), answer, "math", source=name, solution=solution)


def _gpqa(row, where, name):
    raw = str(_field(row, "answer", where))
    m = re.fullmatch(r"\s*(?:\\boxed\{)?\s*\(?([A-Da-d])\)?\s*\}?\s*", raw)
    if not m:
        raise ValueError(f"{where}: field 'answer' {raw!r} is not a letter A-D")
    return make_sample(_field(row, "prompt", where), m.group(1).upper(), "multiple_choice", source=name,
                       choices="ABCD")


def _humaneval(row, where, name):
    test = _field(row, "test", where)
    entry = _field(row, "entry_point", where)
    return make_sample(_field(row, "prompt", where), test, "code", source=name, test=test, entry_point=entry,
                       task_id=row.get("task_id"), canonical_solution=row.get("canonical_solution"))


_FORMATS = {"math": _math, "gsm8k": _gsm8k, "gpqa": _gpqa, "humaneval": _humaneval}


def _guess_format(path: Path, first: dict) -> str:
    if {"test", "entry_point"} <= set(first):
        return "humaneval"
    if "question" in first and "####" in str(first.get("answer", "")):
        return "gsm8k"
    if "gpqa" in path.name.lower():
        return "gpqa"
    if "prompt" in first and "answer" in first:
        return "math"
    raise ValueError(f"{path}:1: cannot tell the benchmark format from fields {sorted(first)}; "
                     "use load_jsonl(path, prompt_field=..., answer_field=..., task=...)")


def load_benchmark(name_or_path: str | Path, limit: int | None = None) -> list[dict]:
    """Samples of a named benchmark (see BENCHMARKS) or of a benchmark-format file."""
    key = str(name_or_path).lower()
    if key in BENCHMARKS:
        filename, fmt = BENCHMARKS[key]
        path, name = benchmarks_dir() / filename, key
        if not path.is_file():
            raise FileNotFoundError(f"benchmark {key!r}: {path} does not exist (looked in {benchmarks_dir()}; "
                                    "set R1KIT_SHARED_DATA to the folder holding benchmarks/)")
    else:
        path, name, fmt = Path(name_or_path), Path(name_or_path).stem, None
        if not path.is_file():
            raise ValueError(f"unknown benchmark {str(name_or_path)!r}: not one of {sorted(BENCHMARKS)} "
                             f"(in {benchmarks_dir()}) and not an existing file")
    samples = []
    for lineno, row in read_jsonl(path, limit):
        fmt = fmt or _guess_format(path, row)
        samples.append(_FORMATS[fmt](row, f"{path}:{lineno}", name))
    if not samples:
        raise ValueError(f"{path}: no samples (empty file)")
    return samples


def load_jsonl(path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer", task: str = "math",
               meta_fields: tuple[str, ...] = (), limit: int | None = None) -> list[dict]:
    """Any JSONL (or .jsonl.gz) of problems, with a mapping of its fields onto the Sample's."""
    samples = []
    for lineno, row in read_jsonl(path, limit):
        where = f"{path}:{lineno}"
        prompt = _field(row, prompt_field, where)
        answer = _field(row, answer_field, where, (str, int, float, list, dict))
        meta = {k: row[k] for k in meta_fields if k in row}
        samples.append(make_sample(prompt, answer, task, source=str(path), **meta))
    return samples


def load_hf(dataset: str, split: str = "test", *, prompt_field: str = "prompt", answer_field: str = "answer",
            task: str = "math", config: str | None = None, limit: int | None = None) -> list[dict]:
    """A Hugging Face dataset (needs `datasets` installed and a network or a local cache)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("load_hf needs the optional `datasets` package (pip install datasets); "
                          "or use load_jsonl on a local file") from None
    rows = datasets.load_dataset(dataset, config, split=split)
    samples = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        where = f"{dataset}[{split}] row {i}"
        samples.append(make_sample(_field(row, prompt_field, where), _field(row, answer_field, where, (str, int, float)),
                                   task, source=dataset))
    return samples
