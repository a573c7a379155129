"""CPU decode kernels (cpu_kernels.c): matrix products at small batch on packed weights.

They run only where they apply (float32 on a CPU, no gradient, outside torch.compile, 2-64 rows)
and where the kernels could be built; everywhere else the model runs torch's ops, so nothing
depends on them.

A decode step multiplies a few rows (the batch) by every weight matrix. torch's CPU products go to
MKL's sgemm, which re-packs the weight into panels on every call; with 2-64 rows that repacking is
much of the cost. `cpu_kernels.c` keeps a packed copy of each weight (made once, remade only when the
weights change, e.g. after a GRPO optimizer step) and streams it once per product. On this
project's 2-core AVX2 CPU (bench/decode_gemm.py), the products of a decode step of the 25M model
and of two R1-Distill-Qwen-1.5B-shaped layers, two runs: on one thread 1.2-2.5x MKL at 2-64 rows
and 0.8-1.2x at one row (which stays on MKL); on two threads 1.4-3.7x at 1-64 rows.

The cost is memory: a packed copy of every linear weight, allocated on first use by a batch of 2
or more rows. `Engine(pack_weights=...)` decides (by default, models whose linear weights fit in
`AUTO_BYTES`); `attach(model)` marks the layers, `project` / `linear` are the call sites.

Dense layers (Qwen2, Llama) go one step further when decoding: `dense_decode_layer` runs a whole
block for one new token per row as one C call (r1_dense_decode_layer): RMSNorm, the fused q|k|v
product, rotary, the cache write, attention over the row's slots, o, RMSNorm, gate|up, SiLU, down,
both residuals. At the sizes r1kit trains here a batched decode step spent as long in torch's
dispatch of its ~50 small ops per layer as in its products (one layer of the GRPO bench's tiny
model, 32 rows: about 0.8 ms of products and 0.5-0.6 ms of everything else); the C layer keeps
the products and little else. Same values as the torch code (tests/test_cpu_kernels.py). Attention
and RMSNorm kernels called one op at a time were measured too and did not pay: a ctypes call costs
about 4 us, and at batch 1 torch's SDPA is as fast.

The C source is compiled with the system C compiler on first use (about a second) into
`$R1KIT_CACHE` (default ~/.cache/r1kit). Without an x86 CPU with AVX2 and FMA, or without a
compiler, `library()` is None and every product stays on torch. `R1KIT_CPU_GEMM=0` turns it off;
`R1KIT_FUSED_DECODE=0` turns off only the fused dense layer.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from r1kit.model.updates import version

SOURCE = Path(__file__).with_name("cpu_kernels.c")
NR = 24  # columns per panel, as in cpu_kernels.c
# where the packed product beats torch's (bench/decode_gemm.py): 2-64 rows; one row too with 2+ threads
# (MKL's one-row kernel is about as fast on one thread, 0.8-1.2x, but gains nothing from a second: 1.5-1.7x)
MIN_ROWS, MAX_ROWS = 2, 64
AUTO_BYTES = 1 << 30  # pack_weights=None packs models whose linear weights (fp32) fit in 1 GiB

_LIB: ctypes.CDLL | None = None
_TRIED = False


def _cache_dir() -> Path:
    return Path(os.environ.get("R1KIT_CACHE") or Path.home() / ".cache" / "r1kit")


def _build(out: Path) -> None:
    """Compile the source to `out`, atomically: a half-written library is never loaded."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run (then torch does every product)."""
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    if os.environ.get("R1KIT_CPU_GEMM", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    path = _cache_dir() / f"cpu_kernels-{digest}.so"
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"r1kit: CPU decode kernels unavailable, using torch's products ({e}). "
                      f"Install a C compiler (gcc) to enable them, or set R1KIT_CPU_GEMM=0 to silence this.")
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.r1_pack.argtypes = [ptr, i64, i64, i64, i64, ptr, i32]
    lib.r1_pack.restype = None
    lib.r1_gemm.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i32]
    lib.r1_gemm.restype = None
    f32 = ctypes.c_float
    lib.r1_dense_decode_layer.argtypes = [ptr, i64, i64, ptr, ptr, f32, ptr, ptr, ptr, ptr, ptr, ptr, i64,
                                          i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, f32, i32]
    lib.r1_dense_decode_layer.restype = i32
    _LIB = lib
    return lib


class PackedWeight:
    """A weight (out, in), as F.linear takes it, packed for r1_gemm. The copy follows the weight:
    before each product it checks the weight is still the tensor, values and layout it packed
    (storage, `updates.version`, shape, strides) and packs again into the same buffer if not.
    `version_key`: the caller's fingerprint of the values instead, for a weight that is a view of
    parameters (a fused group) whose updates its own version does not see."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.key: tuple | None = None

    @staticmethod
    def accepts(x: torch.Tensor, weight: torch.Tensor, min_rows: int = MIN_ROWS) -> bool:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # training, or inside a graph
            return False
        rows = x.numel() // max(x.shape[-1], 1)
        return ((min_rows <= rows or torch.get_num_threads() > 1) and rows <= MAX_ROWS
                and x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
                and library() is not None)

    def _packed(self, weight: torch.Tensor, version_key=None) -> torch.Tensor:
        key = (weight.data_ptr(), version(weight) if version_key is None else version_key,
               tuple(weight.shape), weight.stride())
        if key != self.key:
            N, K = weight.shape
            size = -(-N // NR) * NR * K
            if self.buffer is None or self.buffer.numel() != size:
                self.buffer = torch.empty(size, dtype=torch.float32)
            w = weight.detach()
            # W = weight.t(): (K, N), element [k][n] at weight[n][k]
            library().r1_pack(w.data_ptr(), K, N, w.stride(1), w.stride(0), self.buffer.data_ptr(),
                              torch.get_num_threads())
            self.key = key
        return self.buffer

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 version_key=None) -> torch.Tensor:
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        packed = self._packed(weight, version_key)
        y = torch.empty(x2.shape[0], N, dtype=torch.float32)
        if bias is not None:
            bias = bias.detach().contiguous()
        library().r1_gemm(x2.data_ptr(), x2.shape[0], K, x2.stride(0), packed.data_ptr(), N,
                          bias.data_ptr() if bias is not None else None, y.data_ptr(), N, torch.get_num_threads())
        return y.view(*x.shape[:-1], N)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None, version_key=None) -> torch.Tensor:
    """F.linear(x, weight, bias), through `packed` when it applies (a few rows, no gradient, CPU)."""
    if packed is not None and packed.accepts(x, weight):
        return packed(x, weight, bias, version_key)
    return torch.nn.functional.linear(x, weight, bias)


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for an nn.Linear marked by `attach`; any other layer (a quantized one) is just called."""
    packed = layer.__dict__.get("packed_weight")
    if packed is not None and type(layer) is nn.Linear and packed.accepts(x, layer.weight):
        return packed(x, layer.weight, layer.bias)
    return layer(x)


def linear_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)


def attach(model: nn.Module) -> bool:
    """Give every linear layer of `model` (and its fused groups, and a tied output head) a
    PackedWeight, filled on first use. False (and nothing attached) where the kernels cannot run, or
    under torch.distributed (DDP/FSDP own the parameters; FSDP2 shards them)."""
    import torch.distributed as dist

    if library() is None or (dist.is_available() and dist.is_initialized()):
        return False
    for module in model.modules():
        if type(module) is nn.Linear and "packed_weight" not in module.__dict__:
            module.packed_weight = PackedWeight()
        fused = getattr(module, "fused", None)
        if fused is not None and getattr(fused, "packed", None) is None:
            fused.packed = PackedWeight()
    if getattr(model, "lm_head", "absent") is None:
        model.head_packed = PackedWeight()
    return True


def detach(model: nn.Module) -> None:
    """Drop every packed copy (frees their memory)."""
    for module in model.modules():
        module.__dict__.pop("packed_weight", None)
        module.__dict__.pop("head_packed", None)
        fused = getattr(module, "fused", None)
        if fused is not None:
            fused.packed = None


# r1_dense_decode_layer on (True) or off: tests compare the two paths; R1KIT_FUSED_DECODE=0 turns it off
FUSED_LAYERS = os.environ.get("R1KIT_FUSED_DECODE", "1") != "0"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def dense_decode_layer(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache,
                       slots: torch.Tensor, kv_len: int) -> torch.Tensor | None:
    """`block(x, ...)` for one new token per row (x: (B, 1, hidden)) of a dense block (grouped-query
    attention + SwiGLU MLP, non-interleaved rotary), as one call of the C layer: the products on
    the packed weights and every op between them, without torch's per-op dispatch. Writes the new
    key and value to `cache` like the torch code. None where it does not apply (then the caller
    runs the torch code): no packed weights, gradients on, not float32, under torch.compile, a
    layer replaced or unfused, sizes not multiples of 8, a non-contiguous cache."""
    if not FUSED_LAYERS:
        return None
    attn, mlp = block.self_attn, block.mlp
    qkv, gu = attn.fused, mlp.fused
    o, down = attn.o_proj, mlp.down_proj
    if qkv is None or gu is None or qkv.packed is None or gu.packed is None:
        return None
    po, pd = o.__dict__.get("packed_weight"), down.__dict__.get("packed_weight")
    if po is None or pd is None or type(o) is not nn.Linear or type(down) is not nn.Linear:
        return None
    B, T, Hd = x.shape
    ln1, ln2 = block.input_layernorm, block.post_attention_layernorm
    D, I = attn.head_dim, down.in_features
    k_cache, v_cache = cache
    # one row too: the layer saves far more dispatch than MKL's one-row product gains (0.8-1.2x ours)
    if (T != 1 or not qkv.packed.accepts(x, qkv.weight, min_rows=1) or Hd % 8 or D % 8 or I % 8 or ln1.eps != ln2.eps
            or ln1.weight.dtype != torch.float32 or ln2.weight.dtype != torch.float32
            or k_cache.dtype != torch.float32 or k_cache.shape[0] != B
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or not (qkv.usable() and gu.usable())):
        return None
    qkv_w = qkv.packed._packed(qkv.weight, tuple(version(lin.weight) for lin in qkv.linears))
    gu_w = gu.packed._packed(gu.weight, tuple(version(lin.weight) for lin in gu.linears))
    o_w, down_w = po._packed(o.weight), pd._packed(down.weight)
    qkv_b = None if qkv.bias is None else qkv.bias.detach().contiguous()
    o_b = None if o.bias is None else o.bias.detach().contiguous()
    h = x.contiguous().clone()  # updated in place by the kernel; the caller's x is left as it was
    cos, sin = cos.reshape(B, D // 2).contiguous(), sin.reshape(B, D // 2).contiguous()
    slots = slots.contiguous()
    bad = library().r1_dense_decode_layer(
        h.data_ptr(), B, Hd, ln1.weight.data_ptr(), ln2.weight.data_ptr(), ln1.eps,
        qkv_w.data_ptr(), _ptr(qkv_b), o_w.data_ptr(), _ptr(o_b), gu_w.data_ptr(), down_w.data_ptr(), I,
        attn.n_heads, attn.n_kv_heads, D, cos.data_ptr(), sin.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], slots.data_ptr(), kv_len,
        attn.scale, torch.get_num_threads())
    if bad:
        raise ValueError(f"decode slots {slots.tolist()} fall outside their rows of a cache of "
                         f"{k_cache.shape[1]} slots per row: a position is past the cache's end")
    return h
