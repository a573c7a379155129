"""What a reward returns when it has more to say than one float."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RewardResult:
    score: float  # in [0, 1]
    parts: dict[str, float] = field(default_factory=dict)  # named sub-scores, for logging
    error: str | None = None  # set when a reward raised or returned NaN (the score is then 0)

    def __float__(self) -> float:
        return float(self.score)
