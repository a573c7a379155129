"""The optimizer every r1kit trainer uses: AdamW, fused where the device has the kernel.

transformers' Trainer (and so TRL) defaults to `adamw_torch_fused`; we do the same. The fused kernel
updates every parameter in one pass over weights, gradients and both moments; on this project's CPU
it takes a 1.5M-parameter step in about 1.3 ms where the per-tensor `foreach` kernels take about 8.
Its state (step, exp_avg, exp_avg_sq) has the same keys as the unfused one, so checkpoints written
by either load into the other.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

try:  # torch's own list (private API); the devices with fused Adam kernels since torch 2.4 otherwise
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:  # pragma: no cover
    def _get_fused_kernels_supported_devices() -> list[str]:
        return ["cpu", "cuda", "mps", "xpu"]


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (contiguous in some dimension order): autograd then gives the
    gradient the parameter's own strides, which the GPU's fused kernel requires (the CPU's does not)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _fusable(params: list[torch.Tensor]) -> bool:
    devices = _get_fused_kernels_supported_devices()
    return bool(params) and all(p.is_floating_point() and p.device.type in devices
                                and (p.device.type == "cpu" or _dense(p)) for p in params)


LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW for parameters stored in bf16 or fp16: each keeps a float32 master copy in the optimizer
    state (`master`, beside Adam's moments, also float32). A step swaps the masters in, with the
    gradients in float32, steps them, and rounds them back into the parameters.

    Without it an update smaller than half the spacing of bf16 numbers around a weight is lost: bf16
    keeps 8 significant bits, so a weight of 0.02 moves only by steps of about 8e-5, and AdamW at
    GRPO's learning rate of 1e-6 moves each weight by about 1e-6 a step. Ten such steps left 98% of a
    1536 x 1536 bf16 matrix unchanged; with the masters every weight moved. Forward, backward and
    generation keep running in bf16, at bf16's speed and memory; the masters and moments cost
    12 bytes per parameter.
    """

    @torch.no_grad()
    def step(self, closure=None):
        swapped = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.dtype not in LOW_PRECISION:
                    continue  # a float32 parameter (in a mixed model) is its own master
                master = self.state[p].get("master")
                if master is None:
                    master = p.detach().float()  # the first step: Adam initialises its state on it
                swapped.append((p, p.data, p.grad))
                p.data, p.grad = master, p.grad.float()
        try:
            loss = super().step(closure)
        finally:
            for p, low, grad in swapped:
                self.state[p]["master"] = p.data
                low.copy_(p.data)  # rounded to the parameter's dtype
                p.data, p.grad = low, grad
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts the state to each parameter's dtype (bf16 here); the masters and the
        moments are put back in float32."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)


def adamw(params: Iterable, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over `params` (tensors or param groups); fused when all of them live on a device with the
    kernel; with float32 master weights (MasterWeightAdamW) when any of them is stored in bf16/fp16."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    low = any(p.dtype in LOW_PRECISION for p in tensors)
    sharded = any(type(p).__name__ == "DTensor" for p in tensors)
    if low and sharded:
        import warnings

        warnings.warn("bf16/fp16 parameters sharded by FSDP are stepped in their own precision: small updates "
                      "(lr ~1e-6) are lost to rounding; load the model in float32 instead", stacklevel=2)
    cls = MasterWeightAdamW if low and not sharded else torch.optim.AdamW
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
               fused=True if _fusable(tensors) else None)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, the same total norm and the same clipped gradients, except that
    on a CPU the gradients are not multiplied when the norm is within max_norm (torch multiplies them
    all by 1.0 then: a pass over every gradient, about 1% of a GRPO bench step at 25M parameters). On
    other devices (where deciding would wait for the device) and for sharded gradients, torch's own."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads or any(g.device.type != "cpu" or type(g) is not torch.Tensor or g.is_sparse for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = max_norm / (total + 1e-6)  # as torch computes it, so that clipped gradients are the same bits
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return total
