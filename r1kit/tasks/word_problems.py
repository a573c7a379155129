"""Templated word problems with integer answers (GSM8K-like). Difficulty = number of steps."""
from __future__ import annotations

import random

from r1kit.tasks.base import Task, answer_part, last_number, make_sample, parse_number

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jia", "Kofi", "Lena")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards")


def _step(rng: random.Random, who: str, item: str, have: int):
    """One event: (sentence, new count, worked step)."""
    kind = rng.choice(("buy", "lose", "packs", "double", "share"))
    if kind == "lose" and have > 2:
        n = rng.randint(1, have - 1)
        return f"{who} gives away {n} {item}.", have - n, f"{have}-{n}={have - n}"
    if kind == "packs":
        k, per = rng.randint(2, 6), rng.randint(2, 12)
        return (f"{who} buys {k} packs with {per} {item} in each pack.", have + k * per,
                f"{k}*{per}={k * per}; {have}+{k * per}={have + k * per}")
    if kind == "double" and have < 500:
        return f"A friend gives {who} as many {item} as {who} already has.", 2 * have, f"{have}*2={2 * have}"
    if kind == "share":
        divisors = [d for d in range(2, 7) if have % d == 0 and have // d > 0]
        if divisors:
            d = rng.choice(divisors)
            return (f"{who} splits the {item} into {d} equal piles and keeps one pile.", have // d,
                    f"{have}/{d}={have // d}")
    n = rng.randint(2, 30)
    return f"{who} finds {n} more {item}.", have + n, f"{have}+{n}={have + n}"


class WordProblemTask(Task):
    name = "word_problems"

    def __init__(self, difficulty: int = 2):
        super().__init__(difficulty)

    def sample(self, rng: random.Random) -> dict:
        who, item = rng.choice(NAMES), rng.choice(ITEMS)
        have = start = rng.randint(3, 40)
        sentences, steps = [f"{who} has {have} {item}."], []
        for _ in range(self.difficulty):
            sentence, have, step = _step(rng, who, item, have)
            sentences.append(sentence)
            steps.append(step)
        sentences.append(f"How many {item} does {who} have now?")
        return make_sample(" ".join(sentences), str(have), self.name, steps=steps, start=start)

    def verify(self, answer_text: str, sample: dict) -> bool:
        text = answer_part(answer_text)
        got = parse_number(text)
        if got is None:
            last = last_number(text)
            got = parse_number(last) if last is not None else None
        return got is not None and got == float(sample["answer"])

    def worked_solution(self, sample: dict, rng: random.Random | None = None, sloppy: bool = False) -> tuple[str, str]:
        steps = list(sample["meta"]["steps"])
        if not sloppy:
            return "; ".join(steps), sample["answer"]
        # the systematic wrong solver stops one step early
        if len(steps) > 1:
            steps = steps[:-1]
            return "; ".join(steps), steps[-1].rsplit("=", 1)[1]
        return f"{sample['meta']['start']}", str(sample["meta"]["start"])  # ... or ignores the only event
