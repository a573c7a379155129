"""Mixed precision on a CPU: the big matrix products in bf16, everything else in float32.

CPUs with AMX (Intel Xeon since Sapphire Rapids) multiply bf16 matrices several times faster than
float32 ones: 4-7x on a training step's products here (2 cores, one thread: about 900 against
140 GFLOP/s). `torch.autocast("cpu")` would use them, but around each product it also pays for
what this module avoids:
- it casts every weight again at every forward (a GRPO update runs several: a prompt pass, then a
  forward per length bucket); here each weight is cast once per optimizer step and the copy kept;
- it runs attention in bf16, whose CPU backward is about 10x slower than float32's; here
  attention, norms, softmax and the residual stream stay float32: only linear layers change;
- the output head then gives bf16 logits, whose rounding (about 0.02 nats on a logit of 10) lands
  in every log-probability, so in GRPO's ratios; here the head stays float32.

Inside `bf16_matmuls()`, a linear layer whose weight is float32 on the CPU computes y = x W^T from
bf16 copies of x and W, with float32 accumulation (AMX and oneDNN accumulate in float32), and
returns float32; its backward computes dx = dy W and dW = dy^T x the same way. Parameters, their
gradients and the optimizer stay float32. Numerically this is what autocast does for a linear: the
inputs of each product are rounded to bf16 (8 significant bits).

Off by default. The trainers turn it on where it pays (`wanted`: a CPU with AMX, a model at least
256 wide); it never applies under torch.compile, to sharded (FSDP) weights, or to products too small
to gain (MIN_MACS). Within it r1kit's C decode kernels multiply in bf16 too (cpu_kernels.sync_mode).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from r1kit.model.updates import version

_ON = [False]
_CACHE = WeakIdKeyDictionary()  # weight -> (key, its bf16 copy); an entry goes with its weight


@functools.lru_cache(maxsize=None)
def fast_bf16_cpu() -> bool:
    """True on a CPU with AMX tiles, whose bf16 products beat float32 ones several times over. Without
    AMX (AVX-512 BF16 alone, or AVX2) bf16 products are no faster, or slower, than float32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


AUTO_MIN_HIDDEN = 256  # "auto" leaves narrower models in float32


def wanted(setting: bool | str, device: torch.device | str, hidden_size: int | None = None) -> bool:
    """Whether a trainer's `bf16` setting means bf16 products here: "auto" where they pay (a CPU with
    AMX, and a model at least AUTO_MIN_HIDDEN wide), True on any CPU, False never. (On a GPU the
    trainers use autocast or bf16 weights instead.)

    Why the width: the quickstart's 128-wide models (r1kit quickstart, one run each way, this AMX CPU)
    trained no faster with bf16 products (6.65 against 6.62 min) and ended lower (held-out pass@1
    45.9 -> 64.6 -> 88.8% against float32's 54.1 -> 81.4 -> 96.5%), while GRPO's 256- and 512-wide
    bench models ran their steps 1.3x and 1.7x faster at equal held-out accuracy."""
    if setting not in (True, False, "auto"):
        raise ValueError(f"bf16 must be true, false or 'auto', got {setting!r}")
    if torch.device(device).type != "cpu" or setting is False:
        return False
    if setting is True:
        return True
    return fast_bf16_cpu() and (hidden_size is None or hidden_size >= AUTO_MIN_HIDDEN)


@contextlib.contextmanager
def bf16_matmuls(enabled: bool = True):
    """Within: linear layers with float32 weights on the CPU multiply in bf16 (see the module docstring)."""
    previous = _ON[0]
    _ON[0] = enabled
    try:
        yield
    finally:
        _ON[0] = previous


def bf16_on() -> bool:
    """Whether this is within bf16_matmuls (cpu_kernels then multiplies in bf16 on AMX too)."""
    return _ON[0]


ROWS = 64  # products run on a multiple of this many rows (see `padded`); fewer rows stay float32
# Smaller products stay float32: the casts and padding cost more than bf16 saves. A linear layer's
# forward and backward, one thread here, float32 vs bf16: 768 x 128 x 128 (rows x in x out) 0.78x,
# 256 x 128 x 512 0.93x, 256 x 256 x 256 1.06x, 768 x 128 x 384 1.30x, 256 x 256 x 768 1.57x,
# 768 x 512 x 1536 3.45x.
MIN_MACS = 1 << 25


def active(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of `x` and `weight` runs in bf16 here."""
    if not (_ON[0] and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return (rows >= ROWS and rows * weight.numel() >= MIN_MACS and not torch.compiler.is_compiling()
            and type(weight) in (torch.Tensor, torch.nn.Parameter))


def padded(x2: torch.Tensor) -> torch.Tensor:
    """(n, k) float32 -> (n rounded up to ROWS, k) bf16, the extra rows zero.

    oneDNN, which runs torch's bf16 products on a CPU, builds (JIT-compiles) a kernel for every new
    shape (1-4 ms each here) and keeps them in a cache. A GRPO update's row counts change with every
    length bucket, so nearly every product would build one: with rounded counts a few shapes come
    back again and again. Zero rows add nothing to dW = dy^T x, and their outputs are dropped."""
    n = x2.shape[0]
    out = x2.new_empty(-(-n // ROWS) * ROWS, x2.shape[1], dtype=torch.bfloat16)
    out[:n].copy_(x2)
    out[n:].zero_()
    return out


def low(weight: torch.Tensor, key=None) -> torch.Tensor:
    """A bf16 copy of `weight`, (out, in) and contiguous, made once and kept (as long as the weight
    lives) until the weight changes: `key`, by default its version (in-place writes and optimizer
    steps, r1kit.model.updates)."""
    key = (weight.data_ptr(), version(weight) if key is None else key)
    hit = _CACHE.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad(), torch.inference_mode(False):  # a normal tensor: a later backward may save it
        copy = weight.detach().to(torch.bfloat16).contiguous()
    _CACHE[weight] = (key, copy)
    return copy


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, key=None) -> torch.Tensor:
    """F.linear(x, weight, bias) with bf16 products: call where `active(x, weight)`."""
    return _Bf16Linear.apply(x, weight, bias, low(weight, key))


class _Bf16Linear(torch.autograd.Function):
    """y = x W^T + b from bf16 copies of x and W, in float32; dx and dW the same way. Saves x in bf16
    (half the memory of autograd's float32 copy)."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_low):
        x2 = x.reshape(-1, x.shape[-1])
        x_low = padded(x2)
        y = (x_low @ w_low.t())[:x2.shape[0]].float()
        if bias is not None:
            y += bias
        ctx.save_for_backward(x_low, w_low)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y.view(*x.shape[:-1], w_low.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_low, w_low = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dy_low = padded(dy2)
        dx = (dy_low @ w_low)[:dy2.shape[0]].float().view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = (dy_low.t() @ x_low).float() if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None

