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
bf16 copies of x and W, with float32 accumulation, and returns float32; its backward computes
dx = dy W and dW = dy^T x the same way. Parameters, their gradients and the optimizer stay float32.
The inputs of each product are rounded to bf16 (8 significant bits), as under autocast.

Two ways to run the products (`product`, `gradients`):
- r1kit's C kernels on AMX (cpu_kernels.c, `r1_bf16_*`), where they build: each weight packed into
  AMX tiles once per optimizer step (W^T for y, W for dx), the activations rounded to bf16 inside the
  call, and y, dx and dW written in float32, never rounded. One call per product: nothing is copied
  around it, and no kernel is built per shape, so they pay from smaller products (KERNEL_MIN_MACS).
- torch's bf16 products (oneDNN) elsewhere: x and the cached bf16 weight in, a bf16 result out,
  converted to float32 (one more rounding than the kernels' results).
Memory: the kernels keep two bf16 copies of each weight (together the float32 weight's size) and save
a layer's float32 input for its backward (as float32 autograd does); torch's way one bf16 copy and a
bf16 input.
A linear layer's forward and backward, one thread on this AMX CPU, against the oneDNN way: 1.1-1.4x at
a GRPO update's shapes (544-832 rows, 256-768 wide), 10x at 37 x 70 x 45 (oneDNN's fixed cost).

Off by default. The trainers turn it on where it pays (`wanted`: a CPU with AMX, a model at least
256 wide); it never applies under torch.compile, to sharded (FSDP) weights, or to products too small
to gain (KERNEL_MIN_MACS, MIN_MACS). Within it r1kit's C decode kernels multiply in bf16 too
(cpu_kernels.sync_mode), and so do the MoE experts' grouped products on the C kernels
(`grouped_linear`; on torch's products they stay float32).
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
# r1kit's C kernels (`product`) pay from smaller products: no per-shape kernel builds, no copies around
# them. Forward and backward of one layer here, float32 vs bf16, one thread: 64 x 256 x 256 (rows x in x
# out) 0.99-1.06x, 32 x 256 x 512 1.09x, 15 x 256 x 1536 0.96x, 544 x 256 x 1536 2.62x; two threads (MKL's
# float32 gains more from the second): 64 x 256 x 256 0.78x, 240 x 256 x 256 1.16x. Weights of 128 x 128
# (a product of 128 terms per output) lose or tie at every size (0.5-1.2x), 128 x 384 up to 240 rows.
KERNEL_ROWS, KERNEL_MIN_WEIGHT = 32, 1 << 16
KERNEL_MIN_MACS = 1 << 22  # per thread


def active(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of `x` and `weight` runs in bf16 here."""
    if not (_ON[0] and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if _kernels() is not None:
        least_rows, least_macs = KERNEL_ROWS, KERNEL_MIN_MACS * torch.get_num_threads()
        if weight.numel() < KERNEL_MIN_WEIGHT:
            return False
    else:
        least_rows, least_macs = ROWS, MIN_MACS
    return (rows >= least_rows and rows * weight.numel() >= least_macs and not torch.compiler.is_compiling()
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


def _kernels():
    """r1kit's C kernels where they multiply in bf16 on AMX (cpu_kernels.c), else None."""
    if not KERNELS:
        return None
    from r1kit.model import cpu_kernels  # it imports this module

    lib = cpu_kernels.library()
    return lib if lib is not None and lib.amx else None


KERNELS = True  # False: torch's bf16 products (oneDNN) even where the C kernels could run, to compare
_PACKS = WeakIdKeyDictionary()  # weight -> its _Packs for the C kernels; an entry goes with its weight


class _Packs:
    """One weight (out, in) in the C kernels' bf16 tiles: W^T for y = x W^T, made with the entry, and W
    for dx = dy W, made at the first backward that needs it. Both are made again when `key` (the
    weight's storage and version) changes, i.e. once per optimizer step."""

    __slots__ = ("key", "fwd", "bwd")

    def __init__(self, key):
        self.key, self.fwd, self.bwd = key, None, None

    @staticmethod
    def pack(lib, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
        """weight (out, in) packed as W^T (in, out) if `transposed`, else as W; a stack (E, out, in) of
        MoE experts' matrices one after another, r1_bf16_packed_elems apart."""
        mats = weight.unsqueeze(0) if weight.dim() == 2 else weight
        rows, cols = mats.shape[1:]
        K, N = (cols, rows) if transposed else (rows, cols)
        per = lib.r1_bf16_packed_elems(K, N)
        out = torch.empty(len(mats) * per, dtype=torch.bfloat16)
        for e, w in enumerate(mats):
            sk, sn = (w.stride(1), w.stride(0)) if transposed else (w.stride(0), w.stride(1))
            lib.r1_bf16_pack(w.data_ptr(), K, N, sk, sn, out.data_ptr() + 2 * e * per, torch.get_num_threads())
        return out

    def forward_pack(self, lib, weight):
        if self.fwd is None:  # W^T: (in, out), element [k][n] at weight[n][k]
            self.fwd = self.pack(lib, weight, transposed=True)
        return self.fwd

    def backward_pack(self, lib, weight):
        if self.bwd is None:  # W: (out, in)
            self.bwd = self.pack(lib, weight, transposed=False)
        return self.bwd


def _packs(weight: torch.Tensor, key=None) -> _Packs:
    key = (weight.data_ptr(), version(weight) if key is None else key, tuple(weight.stride()))
    hit = _PACKS.get(weight)
    if hit is None or hit.key != key:
        hit = _PACKS[weight] = _Packs(key)
    return hit


def shares_packs() -> bool:
    """Whether `forward_pack` can serve the decode kernels' bf16 packs (cpu_kernels.PackedWeight)."""
    return _kernels() is not None


def forward_pack(weight: torch.Tensor, key=None) -> torch.Tensor:
    """`weight` (out, in) as W^T in the C kernels' bf16 tiles, made once per value of `key` (default:
    the weight's storage and version) and shared by training's forward products and the decode
    kernels, whose bf16 mode multiplies by the same tiles (r1_gemm, r1_*_decode_stack)."""
    return _packs(weight, key).forward_pack(_kernels(), weight.detach())


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, cols) with unit column stride, what the kernels read (cpu_kernels._row_view)."""
    from r1kit.model.cpu_kernels import _row_view  # it imports this module

    return _row_view(t)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, key=None):
    """y = x W^T + b in float32 from bf16 products, and what `gradients` needs: (y, saved tensors, state).
    Called by the autograd functions (_Bf16Linear, fuse._FusedLinear) where `active(x, weight)`."""
    lib = _kernels()
    if lib is not None:  # the C kernels: x rounded to bf16 inside, y float32 and never rounded
        x2 = _rows(x)
        packs = _packs(weight, key)
        w = weight.detach()
        N, K = w.shape
        y = torch.empty(x2.shape[0], N, dtype=torch.float32)
        b = bias.detach().contiguous() if bias is not None else None
        lib.r1_bf16_gemm(x2.data_ptr(), x2.shape[0], K, x2.stride(0), packs.forward_pack(lib, w).data_ptr(), N,
                         b.data_ptr() if b is not None else None, y.data_ptr(), N, torch.get_num_threads())
        return y.view(*x.shape[:-1], N), (x2, weight), packs
    # torch's bf16 products (oneDNN): bf16 in and out, converted around them
    x2 = x.reshape(-1, x.shape[-1])
    x_low, w_low = padded(x2), low(weight, key)
    y = (x_low @ w_low.t())[:x2.shape[0]].float()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], w_low.shape[0]), (x_low, w_low), None


def gradients(dy: torch.Tensor, saved, state, need_dx: bool, need_dw: bool):
    """dx (rows, in) and dW (out, in), float32 (None where not needed), for `product`'s y = x W^T;
    `saved` and `state` are what it returned."""
    a, w = saved
    if state is not None:  # the C kernels: a is x (float32), w the weight
        lib, nt = _kernels(), torch.get_num_threads()
        dy2 = _rows(dy)
        R, (N, K) = dy2.shape[0], w.shape
        dx = dw = None
        if need_dx:
            dx = torch.empty(R, K, dtype=torch.float32)
            lib.r1_bf16_gemm(dy2.data_ptr(), R, N, dy2.stride(0), state.backward_pack(lib, w.detach()).data_ptr(), K,
                             None, dx.data_ptr(), K, nt)
        if need_dw:
            dw = torch.empty(N, K, dtype=torch.float32)
            lib.r1_bf16_gemm_tn(dy2.data_ptr(), R, N, dy2.stride(0), a.data_ptr(), K, a.stride(0), dw.data_ptr(), K, nt)
        return dx, dw
    dy2 = dy.reshape(-1, dy.shape[-1])
    dy_low = padded(dy2)
    dx = (dy_low @ w)[:dy2.shape[0]].float() if need_dx else None
    dw = (dy_low.t() @ a).float() if need_dw else None
    return dx, dw


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, key=None) -> torch.Tensor:
    """F.linear(x, weight, bias) with bf16 products: call where `active(x, weight)`."""
    return _Bf16Linear.apply(x, weight, bias, key)


class _Bf16Linear(torch.autograd.Function):
    """y = x W^T + b from bf16 copies of x and W, in float32; dx and dW the same way (`product`,
    `gradients`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, key):
        y, saved, ctx.state = product(x, weight, bias, key)
        ctx.save_for_backward(*saved)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, dw = gradients(dy, ctx.saved_tensors, ctx.state, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx.view(ctx.x_shape) if dx is not None else None, dw, db, None


def grouped_active(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the MoE experts' grouped products (x's rows sorted by expert, weight (E, out, in)) run in
    bf16 here: only on r1kit's kernels, which loop over the experts at no cost per shape (torch's
    oneDNN products would build a kernel for every new split of the rows among the experts), and
    where an expert's average share of the rows is a product worth it (`active`'s thresholds)."""
    if not (_ON[0] and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"):
        return False
    if _kernels() is None or torch.compiler.is_compiling() or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False
    per_expert, rows = weight[0].numel(), x.shape[0] // weight.shape[0]
    return (per_expert >= KERNEL_MIN_WEIGHT and rows >= KERNEL_ROWS
            and rows * per_expert >= KERNEL_MIN_MACS * torch.get_num_threads())


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows offsets[e]:offsets[e + 1] of x times weight[e]^T, in float32 from bf16 products (r1kit's
    kernels; call where `grouped_active`). offsets: (E + 1,) int64, from 0 to x's rows."""
    return _GroupedBf16Linear.apply(x, weight, offsets)


class _GroupedBf16Linear(torch.autograd.Function):
    """Each expert's y = x W_e^T on its rows; dx and every dW_e the same way (r1_bf16_gemm_grouped,
    r1_bf16_gemm_tn_grouped), each expert's matrices packed once per optimizer step."""

    @staticmethod
    def forward(ctx, x, weight, offsets):
        lib, nt = _kernels(), torch.get_num_threads()
        x2, (E, N, K) = _rows(x), weight.shape
        offsets = offsets.to(torch.int64).contiguous()
        packs = _packs(weight)
        y = torch.empty(x2.shape[0], N, dtype=torch.float32)
        lib.r1_bf16_gemm_grouped(x2.data_ptr(), offsets.data_ptr(), E, K, x2.stride(0),
                                 packs.forward_pack(lib, weight.detach()).data_ptr(), lib.r1_bf16_packed_elems(K, N), N,
                                 y.data_ptr(), N, nt)
        ctx.save_for_backward(x2, weight, offsets)
        ctx.packs = packs
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, offsets = ctx.saved_tensors
        lib, nt = _kernels(), torch.get_num_threads()
        dy2, (E, N, K) = _rows(dy), weight.shape
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(dy2.shape[0], K, dtype=torch.float32)
            lib.r1_bf16_gemm_grouped(dy2.data_ptr(), offsets.data_ptr(), E, N, dy2.stride(0),
                                     ctx.packs.backward_pack(lib, weight.detach()).data_ptr(),
                                     lib.r1_bf16_packed_elems(N, K), K, dx.data_ptr(), K, nt)
        if ctx.needs_input_grad[1]:
            dw = torch.empty(E, N, K, dtype=torch.float32)
            lib.r1_bf16_gemm_tn_grouped(dy2.data_ptr(), offsets.data_ptr(), E, N, dy2.stride(0), x2.data_ptr(), K,
                                        x2.stride(0), dw.data_ptr(), nt)
        return dx, dw, None
