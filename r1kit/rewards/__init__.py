"""Rule-based rewards (R1 §2.2.2): plain functions of strings, no models.

Each reward is `fn(completion, sample) -> float in [0, 1]`; `combine` weights several and returns
RewardResult(score, parts). Stable API used by outside checks:

    math_reward(completion, answer) -> float
    code_reward(completion, tests, entry_point=None) -> float
    format_reward(completion) -> float
"""
from r1kit.rewards.choice import choice_reward
from r1kit.rewards.code import code_reward
from r1kit.rewards.countdown import countdown_reward
from r1kit.rewards.format import format_reward
from r1kit.rewards.language import language_reward
from r1kit.rewards.length import make_length_reward, soft_overlong
from r1kit.rewards.math import math_reward
from r1kit.rewards.registry import REWARDS, accuracy_reward, combine, count_errors, get_reward, score_batch
from r1kit.rewards.result import RewardResult

__all__ = ["RewardResult", "REWARDS", "get_reward", "combine", "score_batch", "count_errors", "accuracy_reward",
           "math_reward", "code_reward", "format_reward", "countdown_reward", "choice_reward", "language_reward",
           "make_length_reward", "soft_overlong"]
