"""Building blocks shared by every family: RMSNorm, the SwiGLU MLP, rotary embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.model.config import ModelConfig
from r1kit.model.cpu_kernels import project, rms_norm, rope, swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one C pass on a CPU (cpu_kernels.rms_norm)
            return rms_norm(x, self.weight, self.eps)
        # low precision: normalise in fp32, round to the input's dtype, then scale (as HF does)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.fused = None  # gate|up as one product when decoding (fuse.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and self.fused.usable():
            h = swiglu(self.fused(x))  # the halves of one gate|up product
        else:
            h = swiglu(project(self.gate_proj, x), project(self.up_proj, x))
        return project(self.down_proj, h)


# ---------------------------------------------------------------------------- rotary embeddings


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary dims, and the factor applied to cos/sin (YaRN)."""
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = config.rope_type
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        factor = scaling["factor"]
        orig = scaling["original_max_position_embeddings"]
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if scaling.get("attention_factor") is not None:
            attention_factor = scaling["attention_factor"]
        elif mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(correction_dim(beta_fast)), 0)
        hi = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp  # high frequencies keep their value, low ones are interpolated
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.float(), attention_factor


def softmax_scale(config: ModelConfig, head_dim: int) -> float:
    """1/sqrt(d), times mscale^2 under YaRN for MLA (DeepSeek: mscale = 0.1 ln(factor) + 1)."""
    scale = head_dim ** -0.5
    if config.is_mla and config.rope_type == "yarn":
        mscale_all = config.rope_scaling.get("mscale_all_dim", 0)
        if mscale_all:
            m = yarn_mscale(config.rope_scaling["factor"], mscale_all)
            scale = scale * m * m
    return scale


class Rotary(nn.Module):
    """cos/sin by position; `apply` rotates (..., T, heads, dim) tensors."""

    def __init__(self, config: ModelConfig, dim: int, interleave: bool):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # cos | sin of positions 0..n-1 in fp32, grown on demand: a decode step looks its rows up
        # (one gather) instead of computing them (six kernels); same arithmetic, same numbers. A
        # plain attribute, not a buffer: rebuilt where it is needed, never saved or moved.
        self.table: torch.Tensor | None = None
        self.interleave = interleave

    def _freqs(self, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * self.attention_factor

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, bound: int | None = None):
        """positions (B, T) -> cos, sin of shape (B, T, 1, dim/2). `bound` > every position (e.g. the
        cache length) lets the rows come from the table."""
        if bound is None:
            both = self._freqs(positions)
        else:
            table = self.table
            if table is None or table.shape[0] < bound or table.device != positions.device:
                n = max(bound, 2 * table.shape[0] if table is not None else 0)
                with torch.inference_mode(False):  # a plain tensor, usable by training after decoding
                    self.table = self._freqs(torch.arange(n, device=positions.device))
            both = self.table.index_select(0, positions.reshape(-1)).view(*positions.shape, -1)
        cos, sin = both.to(dtype).unsqueeze(2).chunk(2, dim=-1)
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        fast = rope(x, cos, sin, self.interleave)  # one C pass each way on a CPU in float32
        if fast is not None:
            return fast
        if self.interleave:
            # DeepSeek's layout: pairs (x0, x1), (x2, x3), ... each rotated by one frequency. The
            # result is written de-interleaved (evens then odds); q and k get the same layout, so
            # their dot products are exactly those of the interleaved rotation.
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
