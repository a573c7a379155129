"""Has a weight changed? A fingerprint that also sees fused optimizers' updates.

A tensor's `_version` counts in-place writes (`copy_`, `mul_`, a foreach optimizer step), but
torch's fused AdamW (`_fused_adamw_`, what r1kit's trainers use) updates parameters without
bumping it. So every optimizer step is also counted here, per parameter, by a global step hook
(in an attribute of the parameter: a weak-keyed dictionary cost 1.8 us per parameter and step);
`version(t)` combines both. Whoever keeps something derived from weights (the engine's packed
copies, a compiled step with frozen weights) compares versions to know when to rebuild it.
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_ATTR = "_r1kit_optimizer_steps"  # on a parameter: the optimizer steps that updated it
_ALL_STEPS = [0]  # optimizer steps of any optimizer, on any parameters


def _count_step(optimizer, args, kwargs) -> None:
    _ALL_STEPS[0] += 1
    for group in optimizer.param_groups:
        for p in group["params"]:
            setattr(p, _ATTR, getattr(p, _ATTR, 0) + 1)


register_optimizer_step_post_hook(_count_step)


def version(t: torch.Tensor) -> tuple[int, int]:
    """(in-place writes, optimizer steps) of `t`; changes whenever its values may have."""
    try:
        writes = t._version
    except RuntimeError:  # an inference tensor keeps no version; only inference code can write it
        writes = -1
    return writes, getattr(t, _ATTR, 0)


def fingerprint(tensors) -> tuple:
    """What `version` tells of many tensors, cheaply enough to check every decode step: the count of
    all optimizer steps taken anywhere, and each tensor's address and in-place writes. It changes
    whenever a tensor's `version` does (an optimizer step on it moves the global count), and also
    when some other optimizer steps: a caller then checks its tensors one by one, or rebuilds."""
    try:
        return _ALL_STEPS[0], tuple((t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:  # an inference tensor among them keeps no version
        return _ALL_STEPS[0], tuple((t.data_ptr(), version(t)[0]) for t in tensors)
