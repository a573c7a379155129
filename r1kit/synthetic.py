"""Synthetic pretraining corpora for the miniature R1-Zero: worked solutions, some of them wrong on purpose.

A task's `worked_solution(sample, rng, sloppy)` gives (reasoning, answer). The base model learns
completions in the R1-Zero shape; the prompt opens the thinking, so a completion is

    4*3=12 12+5=17; 4*5=20 20-3=17
    </think>

    <answer>4*5-3</answer>

`sloppy_fraction` of them come from the task's systematic wrong solver. That is what gives RL
something to do at the evaluation temperature (DESIGN.md, "What makes the miniature R1-Zero
work"): scattered errors vanish at T=0.6, a systematic wrong mode stays, and GRPO removes it.
"""
from __future__ import annotations

import random


def worked_completion(reasoning: str, answer: str) -> str:
    """The completion a miniature base learns after a prompt that ends in `<think>`."""
    return f"{reasoning}\n</think>\n\n<answer>{answer}</answer>"


def worked_corpus(task, samples: list[dict], num_documents: int, sloppy_fraction: float = 0.5,
                  seed: int = 0) -> tuple[list[dict], dict]:
    """`num_documents` rows {"prompt": question, "completion": worked completion}, drawn from `samples`
    in order (cycling when there are fewer), each by the sloppy solver with probability
    `sloppy_fraction`. Returns (rows, stats), stats counting sloppy and wrong documents."""
    if not samples:
        raise ValueError("worked_corpus: no samples to write solutions for")
    if not 0.0 <= sloppy_fraction <= 1.0:
        raise ValueError(f"worked_corpus: sloppy_fraction must be in [0, 1], got {sloppy_fraction}")
    rng = random.Random(f"corpus-{seed}")
    rows, sloppy, wrong = [], 0, 0
    for i in range(num_documents):
        sample = samples[i % len(samples)]
        is_sloppy = rng.random() < sloppy_fraction
        completion = worked_completion(*task.worked_solution(sample, rng, sloppy=is_sloppy))
        sloppy += is_sloppy
        wrong += not task.verify(completion, sample)
        rows.append({"prompt": sample["prompt"], "completion": completion})
    return rows, {"documents": len(rows), "sloppy_documents": sloppy, "wrong_answers_in_corpus": wrong}
