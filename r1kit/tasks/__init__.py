"""Verifiable problems: procedural generators (each with its verifier) and benchmark loaders.

Every source yields Samples: {"prompt": str, "answer": ..., "task": str, "meta": dict}.

    task = make_task("countdown", difficulty=2)
    samples = task.generate(100, seed=0)
    task.verify("(3+5)*7", samples[0])
    samples = load_benchmark("gsm8k", limit=50)
"""
from __future__ import annotations

from r1kit.tasks.arithmetic import ArithmeticTask
from r1kit.tasks.base import Sample, Task, make_sample, parse_number, validate_sample
from r1kit.tasks.benchmarks import BENCHMARKS, load_benchmark, load_hf, load_jsonl
from r1kit.tasks.countdown import CountdownTask
from r1kit.tasks.programs import CodeTask
from r1kit.tasks.word_problems import WordProblemTask

TASKS: dict[str, type[Task]] = {
    "countdown": CountdownTask,
    "arithmetic": ArithmeticTask,
    "word_problems": WordProblemTask,
    "code": CodeTask,
}


def make_task(name: str, difficulty: int | None = None, **kwargs) -> Task:
    """A generator by name; `difficulty` None keeps the task's own default."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    if difficulty is not None:
        kwargs["difficulty"] = difficulty
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "BENCHMARKS", "Sample", "Task", "make_task", "make_sample", "validate_sample", "parse_number",
           "load_benchmark", "load_jsonl", "load_hf", "ArithmeticTask", "CountdownTask", "WordProblemTask", "CodeTask"]
