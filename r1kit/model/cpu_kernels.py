"""CPU decode kernels (cpu_kernels.c): matrix products at small batch on packed weights, and whole
decoder blocks built on them.

They run only where they apply (float32 on a CPU, no gradient, outside torch.compile, 2-64 rows
for a single product, 1-64 for a decode block) and where the kernels could be built; everywhere else the model runs torch's ops, so nothing
depends on them.

A decode step multiplies a few rows (the batch) by every weight matrix. torch's CPU products go to
MKL's sgemm, which re-packs the weight into panels on every call; with 2-64 rows that repacking is
much of the cost. `cpu_kernels.c` keeps a packed copy of each weight (made once, remade only when the
weights change, e.g. after a GRPO optimizer step) and streams it once per product. On this
project's 2-core AVX2 CPU (bench/decode_gemm.py), the products of a decode step of the 25M model
and of two R1-Distill-Qwen-1.5B-shaped layers, two runs: on one thread 1.2-2.5x MKL at 2-64 rows
and 0.8-1.2x at one row (where a lone product stays on MKL); on two threads 1.4-3.7x at 1-64 rows.

The cost is memory: a packed copy of every linear weight (and MoE expert), allocated on first use. `Engine(pack_weights=...)` decides (by default, models whose linear weights fit in
`AUTO_BYTES`); `attach(model)` marks the layers, `project` / `linear` are the call sites.

Decoding goes one step further: `decode_block` runs a block for one new token per row in C. A
dense block (Qwen2, Llama) is one call (r1_dense_decode_layer): RMSNorm, the fused q|k|v product,
rotary, the cache write, attention over the row's slots, o, RMSNorm, gate|up, SiLU, down, both
residuals. A DeepSeek block's MLA half is one call (r1_mla_decode_attention: q_a, its norm, q_b,
kv_a, its norm, rotary, the latent cache write, W_uk absorbed into the query, attention over the
latent, W_uv, o), and its dense MLP or MoE half another (r1_swiglu_block, r1_moe_block). Per block,
the MoE's routing stays torch's (moe.Router); each expert then runs once in C on the rows routed to
it, from its own packed copy (PackedStack).

And one step further still: `decode_stack` runs every block of the model in one call
(r1_dense_decode_stack, r1_mla_decode_stack, the latter with the router's rules in C too), from a
plan (DenseStack, MLAStack) that keeps each layer's packed weights and pointers and checks cheaply
at every step that nothing changed. The per-block path spent about 0.2 ms of Python per layer (more
with the MoE's routing) finding and checking its weights: at batch 1-16 more than the tiny models'
layers compute. `R1KIT_DECODE_STACK=0` turns the one-call path off (each block its own call).
`decode_step` puts the rest of a step into that call: the embedding rows, the rotary rows and cache
slots, the final norm, the float32 head, and (the engine's steps that sample by temperature alone)
the draw itself. A step's blocks stream the weights through the core's caches, so the dozen torch
ops and the Python around them ran cold, at two to four times their warm cost: generation of the
GRPO bench's tiny model 55 -> 43 ms per call (32 rows, about 37 steps, one thread).

Why: at the sizes r1kit trains here a batched decode step spent as long in torch's dispatch of its
many small ops per layer as in its products (one layer of the GRPO bench's tiny Qwen2 at 32 rows:
about 0.8 ms of products and 0.5-0.6 ms of everything else; the MLA half of the tiny V3 at 64 rows:
1.5 ms for about 0.2 ms of arithmetic). Same values as the torch code (tests/test_cpu_kernels.py).
For decoding, attention and RMSNorm kernels called one op at a time were measured too and did not
pay: a ctypes call costs about 4 us, and at batch 1 torch's SDPA is as fast (training's tensors are
larger: below).

Other pieces serve training (and any float32 forward on a CPU), not only decoding: the bf16 products of
precision.py on AMX (`r1_bf16_*`: y, dx and dW of a linear layer, and the MoE experts' grouped ones);
`rope`, the rotary embedding in one pass each way (GRPO bench's tiny model: step 0.251 -> 0.236 s;
the 128-wide training step 1.05x DeepSeek-V3, 1.06x Qwen2);
`swiglu`, SiLU(gate) * up in one pass forward and one backward (GRPO bench's tiny model, one thread:
its update 0.143 -> 0.137 s; the 25M model's and the 128-wide training step within noise); and
`rms_norm`, one pass each way where torch's CPU rms_norm runs five ops forward (GRPO bench's tiny model:
step 0.236 -> 0.219 s, update 0.153 -> 0.139 s; the 128-wide training step, two threads: 1.03x
DeepSeek-V3, 1.05x Qwen2); `cross_entropy`, the LM loss per row in one pass each way (768 x 512 logits:
525 -> 294 us forward and backward); the MoE's gathers (moe.py: r1_rows_gather, r1_rows_combine with the
gates' product and sum, and r1_moe_plan, a counting sort for the dispatch); the MoE's routed experts,
each one's SwiGLU FFN in one thread with torch's own MKL sgemm (r1_experts_forward / _backward, moe.py's
_ExpertsFFN; `_torch_blas` finds sgemm, `R1KIT_CPU_BLAS=0` leaves the experts on torch's grouped
products); and training's causal attention (r1_attn_forward / _backward, whose autograd function is
cpu_attention.py).

The C source is compiled with the system C compiler on first use (about a second) into
`$R1KIT_CACHE` (default ~/.cache/r1kit), for AVX-512 where torch finds it (panels of 48 columns,
tiles of 8 rows) and AVX2 elsewhere (24 columns, 4 rows); `R1KIT_CPU_ISA=avx2` picks the narrower
build on an AVX-512 CPU, to compare. On a 2-core AVX-512 Xeon, one thread (bench/decode_gemm.py, the
builds run one after the other): the AVX2 build's products lost to MKL at 32-64 rows (0.84x, 0.68x);
the AVX-512 build with its prefetch ran them at 1.34x and 1.04x MKL (2.15x at 8 rows), and a 32-row
decode step of the 25M model took 21.3 ms against the AVX2 build's 32.3 ms. Without an x86 CPU with
AVX2 and FMA, or without a compiler, `library()` is None and every product stays on torch. `R1KIT_CPU_GEMM=0` turns it off;
`R1KIT_FUSED_DECODE=0` turns off only the C blocks (`decode_block`).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from r1kit.model import precision
from r1kit.model.updates import fingerprint, version

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# where the packed product beats torch's (bench/decode_gemm.py): 2-64 rows; one row too with 2+ threads
# (MKL's one-row kernel is about as fast on one thread, 0.8-1.2x, but gains nothing from a second: 1.5-1.7x)
MIN_ROWS, MAX_ROWS = 2, 64
AUTO_BYTES = 1 << 30  # pack_weights=None packs models whose linear weights (fp32) fit in 1 GiB

_LIB: ctypes.CDLL | None = None
_TRIED = False


def _cache_dir() -> Path:
    return Path(os.environ.get("R1KIT_CACHE") or Path.home() / ".cache" / "r1kit")


def _isa() -> str:
    """The instruction set the kernels are built for: AVX-512 where torch finds it (wider products,
    more rows per tile), with AMX's bf16 tiles too where the CPU has them, else AVX2."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return "avx2"
    return "amx" if precision.fast_bf16_cpu() else "avx512"


FLAGS = {"avx2": ["-mavx2", "-mfma"], "avx512": ["-mavx512f", "-mavx512vl", "-mavx2", "-mfma"]}
FLAGS["amx"] = FLAGS["avx512"] + ["-mavx512bf16", "-mamx-tile", "-mamx-bf16"]


def _build(out: Path, isa: str) -> None:
    """Compile the source to `out` for `isa`, atomically: a half-written library is never loaded."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, "-O3", *FLAGS[isa], "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", tmp]
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
    native = _isa()
    wanted = os.environ.get("R1KIT_CPU_ISA") or native  # R1KIT_CPU_ISA=avx2: the narrower build, to compare
    runs = {"avx2", native} | ({"avx512"} if native == "amx" else set())
    if wanted not in runs:
        raise ValueError(f"R1KIT_CPU_ISA={wanted!r}: this CPU runs {sorted(runs)}; unset it or pick one")
    lib, errors = None, []
    # a compiler without AMX (or AVX-512) support still builds the narrower ones
    for isa in dict.fromkeys([wanted] + (["avx512"] if wanted == "amx" else []) + ["avx2"]):
        path = _cache_dir() / f"cpu_kernels-{digest}-{isa}.so"
        try:
            if not path.exists():
                _build(path, isa)
            lib = ctypes.CDLL(str(path))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(f"{isa}: {e}")
    if lib is None:
        warnings.warn(f"r1kit: CPU decode kernels unavailable, using torch's products ({'; '.join(errors)}). "
                      f"Install a C compiler (gcc) to enable them, or set R1KIT_CPU_GEMM=0 to silence this.")
        return None
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.r1_nr.argtypes = []
    lib.r1_nr.restype = i64
    lib.nr = lib.r1_nr()  # the build's panel width
    lib.r1_packed_floats.argtypes = [i64, i64]
    lib.r1_packed_floats.restype = i64
    lib.r1_set_bf16.argtypes = [i32]
    lib.r1_set_bf16.restype = i32
    lib.r1_amx_init.argtypes = []
    lib.r1_amx_init.restype = i32
    # bf16 products on AMX: this build has them, and the OS let the process use the tiles
    lib.amx = isa == "amx" and bool(lib.r1_amx_init())
    lib.r1_pack.argtypes = [ptr, i64, i64, i64, i64, ptr, i32]
    lib.r1_pack.restype = None
    lib.r1_gemm.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i32]
    lib.r1_gemm.restype = None
    # training's bf16 products (precision.py): y = x W^T, dx = dy W, dW = dy^T x
    lib.r1_bf16_packed_elems.argtypes = [i64, i64]
    lib.r1_bf16_packed_elems.restype = i64
    lib.r1_bf16_pack.argtypes = [ptr, i64, i64, i64, i64, ptr, i32]
    lib.r1_bf16_pack.restype = None
    lib.r1_bf16_gemm.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i32]
    lib.r1_bf16_gemm.restype = None
    lib.r1_bf16_gemm_tn.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, i32]
    lib.r1_bf16_gemm_tn.restype = None
    lib.r1_bf16_gemm_grouped.argtypes = [ptr, ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, i32]
    lib.r1_bf16_gemm_grouped.restype = None
    lib.r1_bf16_gemm_tn_grouped.argtypes = [ptr, ptr, i64, i64, i64, ptr, i64, i64, ptr, i32]
    lib.r1_bf16_gemm_tn_grouped.restype = None
    lib.r1_swiglu_forward.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, i64, i32]
    lib.r1_swiglu_forward.restype = None
    lib.r1_swiglu_backward.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, ptr, i64, ptr, i64, i32]
    lib.r1_swiglu_backward.restype = None
    lib.r1_rms_norm_forward.argtypes = [ptr, i64, i64, i64, ptr, f32, ptr, i64, ptr, i32]
    lib.r1_rms_norm_forward.restype = None
    lib.r1_rms_norm_backward.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i32]
    lib.r1_rms_norm_backward.restype = None
    lib.r1_rope.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, i32, i32, ptr, i32]
    lib.r1_rope.restype = None
    lib.r1_rows_gather.argtypes = [ptr, ptr, i64, i64, i64, ptr, i32]
    lib.r1_rows_gather.restype = None
    lib.r1_rows_combine.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, i32]
    lib.r1_rows_combine.restype = None
    lib.r1_rows_combine_backward.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i32]
    lib.r1_rows_combine_backward.restype = None
    lib.r1_xent_forward.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i32]
    lib.r1_xent_forward.restype = i32
    lib.r1_xent_backward.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i32]
    lib.r1_xent_backward.restype = None
    lib.r1_moe_plan.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    lib.r1_moe_plan.restype = i32
    lib.r1_attn_forward.argtypes = [ptr, i64, i64, i64, i64, f32, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.r1_attn_forward.restype = i32
    lib.r1_attn_backward.argtypes = [ptr, i64, i64, i64, i64, f32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.r1_attn_backward.restype = i32
    lib.r1_dense_decode_layer.argtypes = [ptr, i64, i64, ptr, ptr, f32, ptr, ptr, ptr, ptr, ptr, ptr, i64,
                                          i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, f32, i32]
    lib.r1_dense_decode_layer.restype = i32
    lib.r1_dense_decode_stack.argtypes = [ptr, i64, i64, i64, ptr, f32, i64, i64, i64, i64, ptr, ptr, i64,
                                          ptr, i64, f32, i32]
    lib.r1_dense_decode_stack.restype = i32
    lib.r1_mla_decode_stack.argtypes = [ptr, i64, i64, i64, ptr, ptr, f32, f32, f32, ptr, ptr, i64, ptr, i64, i32]
    lib.r1_mla_decode_stack.restype = i32
    lib.r1_swiglu_block.argtypes = [ptr, i64, i64, ptr, f32, ptr, ptr, i64, i32]
    lib.r1_swiglu_block.restype = None
    lib.r1_mla_decode_attention.argtypes = [ptr, i64, i64, ptr, f32, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr,
                                            ptr, i64, i64, i64, i64, i64, i32, ptr, ptr, ptr, i64, ptr, i64, f32, i32]
    lib.r1_mla_decode_attention.restype = i32
    lib.r1_moe_block.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, ptr, i64, ptr, i64, i64, i64, ptr, ptr, i64, i32]
    lib.r1_moe_block.restype = None
    lib.r1_dense_decode_step.argtypes = [ptr, i64, ptr, f32, i64, i64, i64, i64, i64, f32, i32]
    lib.r1_dense_decode_step.restype = i32
    lib.r1_mla_decode_step.argtypes = [ptr, i64, ptr, ptr, f32, f32, f32, i64, i32]
    lib.r1_mla_decode_step.restype = i32
    lib.r1_set_blas.argtypes = [ptr, ptr]
    lib.r1_set_blas.restype = i32
    lib.r1_experts_forward.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i32]
    lib.r1_experts_forward.restype = None
    lib.r1_experts_backward.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.r1_experts_backward.restype = None
    lib.blas = bool(lib.r1_set_blas(*_torch_blas()))  # the MoE experts' products (moe.py's _ExpertsFFN)
    _LIB = lib
    return lib


def _torch_blas() -> tuple[int | None, int | None]:
    """The addresses of sgemm_ and MKL_Set_Num_Threads_Local in torch's own library (its x86 Linux wheels
    link MKL in and export them), or (None, None): torch's products are then used. MKL only: inside our
    threads it must run single-threaded, which MKL_Set_Num_Threads_Local makes sure of."""
    if os.environ.get("R1KIT_CPU_BLAS", "1") == "0":
        return None, None
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = Path(torch.__file__).parent / "lib" / name
        if not path.exists():
            continue
        try:
            blas = ctypes.CDLL(str(path))
            sgemm, local = blas.sgemm_, blas.MKL_Set_Num_Threads_Local  # C call: by value
        except (OSError, AttributeError):
            return None, None
        return ctypes.cast(sgemm, ctypes.c_void_p).value, ctypes.cast(local, ctypes.c_void_p).value
    return None, None


def packed_size(N: int, K: int) -> int:
    """Floats in the packed copy of a (K, N) matrix: whole panels of the build's width (r1_nr), or
    AMX's bf16 tiles in bf16 mode."""
    return library().r1_packed_floats(K, N)


_BF16 = [False]  # the library's mode: products in bf16 on AMX (r1_set_bf16)


def sync_mode(allow: bool = True) -> bool:
    """Put the kernels in bf16 mode within precision.bf16_matmuls, where the build has AMX, and in
    float32 mode elsewhere or where not `allow`ed (the output head); True in bf16 mode. Packs and
    decode plans keep the mode they were made in (their keys hold it): a pack made in the other mode
    is made again on its next use."""
    want = allow and precision.bf16_on() and library().amx
    if want != _BF16[0]:
        _BF16[0] = bool(library().r1_set_bf16(int(want)))
    return _BF16[0]


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
        if _BF16[0] and precision.shares_packs():
            # bf16 tiles: the very ones training's forward products use (precision.forward_pack), made
            # once per weight change for both (GRPO generates, then trains on the same weights)
            self.buffer, self.key = None, None
            return precision.forward_pack(weight, version_key)
        key = (weight.data_ptr(), version(weight) if version_key is None else version_key,
               tuple(weight.shape), weight.stride(), _BF16[0])
        if key != self.key:
            N, K = weight.shape
            size = packed_size(N, K)
            if self.buffer is None or self.buffer.numel() != size:
                self.buffer = torch.empty(size, dtype=torch.float32)
            w = weight.detach()
            # W = weight.t(): (K, N), element [k][n] at weight[n][k]
            library().r1_pack(w.data_ptr(), K, N, w.stride(1), w.stride(0), self.buffer.data_ptr(),
                              torch.get_num_threads())
            self.key = key
        return self.buffer

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 version_key=None, bf16: bool = True) -> torch.Tensor:
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        sync_mode(bf16)
        packed = self._packed(weight, version_key)
        y = torch.empty(x2.shape[0], N, dtype=torch.float32)
        if bias is not None:
            bias = bias.detach().contiguous()
        library().r1_gemm(x2.data_ptr(), x2.shape[0], K, x2.stride(0), packed.data_ptr(), N,
                          bias.data_ptr() if bias is not None else None, y.data_ptr(), N, torch.get_num_threads())
        return y.view(*x.shape[:-1], N)


class PackedStack:
    """Every matrix of a stacked (E, out, in) parameter (MoE experts: gate_up_proj, down_proj) packed
    for r1_gemm, one after another in one buffer; packed again when the parameter changes."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.key: tuple | None = None

    def get(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The buffer and the floats from one matrix's packing to the next."""
        E, N, K = weight.shape
        per = packed_size(N, K)
        if _BF16[0] and precision.shares_packs():  # the tiles training's grouped products use, as PackedWeight
            self.buffer, self.key = None, None
            return precision.forward_pack(weight), per
        key = (weight.data_ptr(), version(weight), tuple(weight.shape), weight.stride(), _BF16[0])
        if key != self.key:
            if self.buffer is None or self.buffer.numel() != E * per:
                self.buffer = torch.empty(E * per, dtype=torch.float32)
            w = weight.detach()
            for e in range(E):  # W_e = weight[e].t(): (K, N), element [k][n] at weight[e][n][k]
                library().r1_pack(w[e].data_ptr(), K, N, w.stride(2), w.stride(1),
                                  self.buffer.data_ptr() + 4 * e * per, torch.get_num_threads())
            self.key = key
        return self.buffer, per


def _is_experts(module: nn.Module) -> bool:
    w = getattr(module, "gate_up_proj", None)
    return isinstance(w, nn.Parameter) and w.dim() == 3


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None, version_key=None, bf16: bool = True) -> torch.Tensor:
    """F.linear(x, weight, bias), through `packed` when it applies (a few rows, no gradient, CPU);
    `bf16=False`: in float32 even within precision.bf16_matmuls (the output head)."""
    if packed is not None and packed.accepts(x, weight):
        return packed(x, weight, bias, version_key, bf16=bf16)
    return torch.nn.functional.linear(x, weight, bias)


def project(layer: nn.Module, x: torch.Tensor, bf16: bool = True) -> torch.Tensor:
    """layer(x) for an nn.Linear: through its packed copy where `attach` gave it one and it applies, in
    bf16 products within precision.bf16_matmuls (unless `bf16=False`: the output head); any other
    layer (a quantized one) is just called."""
    packed = layer.__dict__.get("packed_weight")
    if packed is not None and type(layer) is nn.Linear and packed.accepts(x, layer.weight):
        return packed(x, layer.weight, layer.bias, bf16=bf16)
    if bf16 and type(layer) is nn.Linear and precision.active(x, layer.weight):  # bf16 products (precision.bf16_matmuls)
        return precision.linear(x, layer.weight, layer.bias)
    return layer(x)


def linear_bytes(model: nn.Module) -> int:
    """Bytes (fp32) of what `attach` would pack: linear weights and MoE experts."""
    return (sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)
            + sum((m.gate_up_proj.numel() + m.down_proj.numel()) * 4 for m in model.modules() if _is_experts(m)))


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
        if _is_experts(module) and "packed_stacks" not in module.__dict__:
            module.packed_stacks = (PackedStack(), PackedStack())
    if getattr(model, "lm_head", "absent") is None:
        model.head_packed = PackedWeight()
    return True


def detach(model: nn.Module) -> None:
    """Drop every packed copy (frees their memory), and the decode plan that points at them."""
    model.__dict__.pop("_decode_stack", None)
    for module in model.modules():
        module.__dict__.pop("packed_weight", None)
        module.__dict__.pop("head_packed", None)
        module.__dict__.pop("packed_stacks", None)
        fused = getattr(module, "fused", None)
        if fused is not None:
            fused.packed = None


# the fused decode blocks on (True) or off: tests compare the two paths; R1KIT_FUSED_DECODE=0 turns them off
FUSED_LAYERS = os.environ.get("R1KIT_FUSED_DECODE", "1") != "0"
# every block of a step in one call (decode_stack) on (True) or off: then each block is its own call;
# R1KIT_DECODE_STACK=0 turns it off
STACKED = os.environ.get("R1KIT_DECODE_STACK", "1") != "0"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _group(fused) -> torch.Tensor | None:
    """The packed matrix of a fused group (fuse.Fused), fresh; None if the group cannot be used."""
    if fused is None or fused.packed is None or not fused.usable():
        return None
    return fused.packed._packed(fused.weight, tuple(version(lin.weight) for lin in fused.linears))


def _single(layer: nn.Module) -> torch.Tensor | None:
    """The packed weight of a plain nn.Linear marked by `attach`, fresh; None otherwise."""
    packed = layer.__dict__.get("packed_weight")
    if packed is None or type(layer) is not nn.Linear:
        return None
    return packed._packed(layer.weight)


def _f32(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in tensors)


def decode_block(block: nn.Module, x: torch.Tensor, rotary, cos: torch.Tensor, sin: torch.Tensor, cache,
                 slots: torch.Tensor, kv_len: int) -> torch.Tensor | None:
    """`block(x, ...)` (model/transformer.Block) for one new token per row, x (B, 1, hidden), in C where
    it applies: the products on the packed weights and every op between them, without torch's per-op
    dispatch; the cache is written as the torch code writes it.
    - dense block (grouped-query attention + SwiGLU MLP): the whole block in one call;
    - DeepSeek block: the MLA attention half in one call (absorbed, as MLAttention decodes), then the
      dense MLP or the MoE in one more (MoE routing in torch: the same experts chosen).
    None where it does not apply (the caller runs the torch code): no packed weights, gradients on,
    not float32, under torch.compile, a layer replaced or unfused, a size not a multiple of 8, a
    non-contiguous cache. Row m attends to its slots 0..min(position, kv_len - 1): the mask that
    Transformer.forward builds from the positions, which is why the mask is not an argument."""
    if not FUSED_LAYERS or x.shape[1] != 1 or kv_len is None or slots is None:
        return None
    attn, mlp = block.self_attn, block.mlp
    ln1, ln2 = block.input_layernorm, block.post_attention_layernorm
    fused = getattr(attn, "fused", None)
    # one row too: the block saves far more dispatch than MKL's one-row product gains (0.8-1.2x ours)
    if fused is None or fused.packed is None or not fused.packed.accepts(x, fused.weight, min_rows=1):
        return None
    sync_mode()
    B, _, Hd = x.shape
    dense_mlp = type(getattr(mlp, "down_proj", None)) is nn.Linear and getattr(mlp, "fused", None) is not None
    if Hd % 8 or ln1.eps != ln2.eps or not _f32(ln1.weight, ln2.weight):
        return None
    if getattr(attn, "kv_lora_rank", None) is None:  # grouped-query attention
        if not dense_mlp or rotary.interleave:
            return None
        return _dense_block(block, x, cos, sin, cache, slots, kv_len)
    h = _mla_half(block, x, rotary, cos, sin, cache, slots, kv_len)
    if h is None:
        return None
    if dense_mlp and _swiglu_half(h, ln2, mlp):
        return h
    if not dense_mlp and _moe_half(h, ln2, mlp):
        return h
    return h + mlp(ln2(h))


def _dense_block(block, x, cos, sin, cache, slots, kv_len) -> torch.Tensor | None:
    attn, mlp = block.self_attn, block.mlp
    ln1, ln2 = block.input_layernorm, block.post_attention_layernorm
    B, _, Hd = x.shape
    D, I = attn.head_dim, mlp.down_proj.in_features
    k_cache, v_cache = cache
    if D % 8 or I % 8 or k_cache.shape[0] != B or not _f32(k_cache, v_cache):
        return None
    qkv_w, gu_w = _group(attn.fused), _group(mlp.fused)
    o_w, down_w = _single(attn.o_proj), _single(mlp.down_proj)
    if qkv_w is None or gu_w is None or o_w is None or down_w is None:
        return None
    qkv_b = None if attn.fused.bias is None else attn.fused.bias.detach().contiguous()
    o_b = None if attn.o_proj.bias is None else attn.o_proj.bias.detach().contiguous()
    h = x.contiguous().clone()  # updated in place by the kernel; the caller's x is left as it was
    cos, sin = cos.reshape(B, D // 2).contiguous(), sin.reshape(B, D // 2).contiguous()
    slots = slots.contiguous()
    bad = library().r1_dense_decode_layer(
        h.data_ptr(), B, Hd, ln1.weight.data_ptr(), ln2.weight.data_ptr(), ln1.eps,
        qkv_w.data_ptr(), _ptr(qkv_b), o_w.data_ptr(), _ptr(o_b), gu_w.data_ptr(), down_w.data_ptr(), I,
        attn.n_heads, attn.n_kv_heads, D, cos.data_ptr(), sin.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], slots.data_ptr(), kv_len,
        attn.scale, torch.get_num_threads())
    _check(bad, slots, k_cache.shape[1])
    return h


class _Stack:
    """Every block of a model for one decode step in one C call: the per-layer path (`decode_block`)
    pays about 0.2 ms of Python per layer (more for a MoE layer, whose routing runs in torch) to find
    and check its weights, as much as a tiny model's layer computes at 32 rows.

    Built once (`build`: every layer passes the per-layer path's checks, with the same shapes), it
    keeps each layer's packed weights and pointers (`ptrs`, one int64 row per layer). Each step checks,
    cheaply, that nothing it relies on changed: the same modules in the same places (`links`), every
    weight, bias, norm and buffer at the same address with the same version (`fingerprint`; an
    optimizer step changes it), and no MoE in training mode (which counts expert load in torch).
    If anything did, the caller builds it again, which packs the changed weights again."""

    def __init__(self, links, tensors, ptrs, dims, moes=(), packs=()):
        self.links, self.tensors, self.moes = links, tensors, list(moes)
        self.packs = list(packs)  # the packed weights `ptrs` points at, kept alive with the plan
        self.key = self.fingerprint()
        self.ptrs = ptrs
        self.dims = dims
        self.cache_key = None
        self.lock = threading.Lock()  # run() points `ptrs` at its cache: one step at a time per model
        self._io, self._io_table, self._scratch = None, None, {}  # decode_step's

    def __deepcopy__(self, memo):
        """A copied model (GRPO's reference model is a deepcopy) leaves the plan behind: it points at
        the original's packed weights and holds a lock, which cannot be copied. The copy's next decode
        plans again where it can."""
        return None

    def fingerprint(self) -> tuple:
        # a per-tensor version() of ~100 weights cost ~0.8 ms a step; the mode: packs are made in it
        return fingerprint(self.tensors), _BF16[0]

    def valid(self) -> bool:
        return (all(parent.get(name) is obj for parent, name, obj in self.links)
                and not any(moe.training for moe in self.moes) and self.fingerprint() == self.key)

    @staticmethod
    def _link(parent: nn.Module, *names: str) -> list:
        return [(parent._modules, name, parent._modules.get(name)) for name in names]

    @staticmethod
    def _ends(model) -> tuple[list, list]:
        """Links and tensors of the embedding, final norm and output head, which decode_step reads."""
        links = _Stack._link(model.model, "embed_tokens", "norm") + _Stack._link(model, "lm_head")
        modules = (model.model.embed_tokens, model.model.norm, model.lm_head)
        return links, [w for w in (getattr(m, "weight", None) for m in modules) if torch.is_tensor(w)]

    def step_io(self, model, S: int) -> "_StepIO | None":
        """decode_step's fixed fields (embedding, rotary table, final norm, packed head), made once per
        plan (and again when the rotary table grows); None where those parts do not fit it."""
        rotary = model.rotary
        if rotary.table is None or rotary.table.shape[0] < S:
            rotary.cos_sin(torch.zeros(1, 1, dtype=torch.long), torch.float32, bound=S)  # grows it, as a step does
        if self._io is None or self._io_table is not rotary.table:
            io = _fixed_io(model, rotary.table)
            self._io, self._io_table = (io[0], rotary.table) if io else (False, rotary.table)
            self.packs.append(io[1] if io else None)  # the packed head `_io` points at, kept alive with the plan
        return self._io or None

    def scratch(self, B: int, half: int) -> tuple:
        """Per batch size: h, cos|sin, slots and logits buffers for decode_step's sampling steps."""
        bufs = self._scratch.get(B)
        if bufs is None:
            Hd, N = self._io.Hd, self._io.N
            bufs = self._scratch[B] = (torch.empty(B, Hd), torch.empty(2, B, half), torch.empty(B, dtype=torch.int64),
                                       torch.empty(B, N))
        return bufs

    @staticmethod
    def _weights(*layers) -> list:
        return [t for lin in layers for t in (lin.weight, getattr(lin, "bias", None)) if t is not None]


class DenseStack(_Stack):
    """A dense model (Qwen2, Llama): r1_dense_decode_stack; `ptrs` columns as it takes them, the
    caches' (8, 9) set per cache."""

    @staticmethod
    def build(model) -> "DenseStack | None":
        layers = model.model.layers
        links, tensors, rows, dims, packs = _Stack._link(model.model, "layers"), [], [], None, []
        for i, block in enumerate(layers):
            attn, mlp = block.self_attn, block.mlp
            ln1, ln2 = block.input_layernorm, block.post_attention_layernorm
            fa, fm = getattr(attn, "fused", None), getattr(mlp, "fused", None)
            if (getattr(attn, "kv_lora_rank", None) is not None or fa is None or fm is None
                    or type(getattr(attn, "o_proj", None)) is not nn.Linear
                    or type(getattr(mlp, "down_proj", None)) is not nn.Linear or model.rotary.interleave):
                return None
            qkv_w, gu_w = _group(fa), _group(fm)
            o_w, down_w = _single(attn.o_proj), _single(mlp.down_proj)
            packs += [qkv_w, gu_w, o_w, down_w]
            D, I, Hd = attn.head_dim, mlp.down_proj.in_features, ln1.weight.shape[0]
            here = (ln1.eps, I, attn.n_heads, attn.n_kv_heads, D, attn.scale)
            qkv_b, o_b = fa.bias, attn.o_proj.bias
            if (qkv_w is None or gu_w is None or o_w is None or down_w is None or D % 8 or I % 8 or Hd % 8
                    or ln1.eps != ln2.eps or not _f32(ln1.weight, ln2.weight, qkv_b, o_b)
                    or (dims is not None and here != dims)):
                return None
            dims = here
            rows.append([ln1.weight.data_ptr(), ln2.weight.data_ptr(), qkv_w.data_ptr(), _ptr(qkv_b) or 0,
                         o_w.data_ptr(), _ptr(o_b) or 0, gu_w.data_ptr(), down_w.data_ptr(), 0, 0])
            links += [(layers._modules, str(i), block)]
            links += _Stack._link(block, "self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
            links += _Stack._link(attn, *fa.names, "o_proj") + _Stack._link(mlp, *fm.names, "down_proj")
            tensors += _Stack._weights(*fa.linears, attn.o_proj, *fm.linears, mlp.down_proj, ln1, ln2)
        if not rows:
            return None
        ends = _Stack._ends(model)
        return DenseStack(links + ends[0], tensors + ends[1], torch.tensor(rows, dtype=torch.int64), dims, packs=packs)

    def bind(self, cache, B: int) -> int | None:
        """Point the plan at `cache` (B rows); its slots per row, or None where it does not fit."""
        k0 = cache.layers[0][0] if isinstance(cache.layers[0], tuple) else None
        if k0 is None or k0.shape[0] != B:
            return None
        key = tuple((t.data_ptr(), t.shape, t.stride()) for layer in cache.layers for t in layer)
        if key != self.cache_key:
            for i, layer in enumerate(cache.layers):
                if not isinstance(layer, tuple) or len(layer) != 2 or not _f32(*layer) or layer[0].shape != k0.shape:
                    return None
                self.ptrs[i, 8], self.ptrs[i, 9] = layer[0].data_ptr(), layer[1].data_ptr()
            self.cache_key = key
        return k0.shape[1]

    def run(self, h, cos, sin, cache, slots, kv_len) -> bool:
        B, _, Hd = h.shape
        S = self.bind(cache, B)
        if S is None:
            return False
        eps, I, H, Hkv, D, scale = self.dims
        cos, sin = cos.reshape(B, D // 2).contiguous(), sin.reshape(B, D // 2).contiguous()
        bad = library().r1_dense_decode_stack(h.data_ptr(), B, Hd, len(self.ptrs), self.ptrs.data_ptr(), eps, I, H,
                                              Hkv, D, cos.data_ptr(), sin.data_ptr(), S, slots.data_ptr(), kv_len,
                                              scale, torch.get_num_threads())
        _check(bad, slots, S)
        return True

    def step(self, io, kv_len: int) -> int:
        eps, I, H, Hkv, D, scale = self.dims
        return library().r1_dense_decode_step(ctypes.byref(io), len(self.ptrs), self.ptrs.data_ptr(), eps, I, H, Hkv, D,
                                              kv_len, scale, torch.get_num_threads())


class MLAStack(_Stack):
    """A DeepSeek model (MLA, dense MLP or DeepSeekMoE per layer): r1_mla_decode_stack, with the MoE's
    routing in C too (the same rules as moe.Router); `ptrs` columns as it takes them, the cache's (10)
    set per cache."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        (Nfq, H, NOPE, R, V, C, interleave, _, _), (E, k, n_group, topk_group, softmax, norm, _) = self.dims
        # the integer dims, as r1_mla_decode_stack takes them
        self.dims_c = torch.tensor([Nfq, H, NOPE, R, V, C, interleave, E, k, n_group, topk_group, softmax, norm],
                                   dtype=torch.int64)

    @staticmethod
    def build(model) -> "MLAStack | None":
        layers = model.model.layers
        links, tensors, rows, moes, packs = _Stack._link(model.model, "layers"), [], [], [], []
        attn_dims = moe_dims = None  # the same in every layer (every MoE layer)
        for i, block in enumerate(layers):
            attn, mlp = block.self_attn, block.mlp
            ln1, ln2 = block.input_layernorm, block.post_attention_layernorm
            fa, kvb = getattr(attn, "fused", None), getattr(attn, "kv_b_proj", None)
            if getattr(attn, "kv_lora_rank", None) is None or fa is None or type(kvb) is not nn.Linear:
                return None
            C, R, NOPE, V, H = attn.kv_lora_rank, attn.rope_dim, attn.nope_dim, attn.v_dim, attn.n_heads
            Nfq, q_lora = fa.sizes[0], attn.q_lora_rank
            Hd = ln1.weight.shape[0]
            if (C % 8 or NOPE % 8 or V % 8 or (C + R) % 8 or R % 2 or R > 512 or Hd % 8 or (q_lora and Nfq % 8)
                    or kvb.weight.stride(0) != 1 or kvb.weight.dtype != torch.float32
                    or type(getattr(attn, "o_proj", None)) is not nn.Linear):
                return None
            f_w, o_w = _group(fa), _single(attn.o_proj)
            q_b_w = _single(attn.q_b_proj) if q_lora else None
            packs += [f_w, o_w, q_b_w]
            q_ln = attn.q_a_layernorm if q_lora else None
            eps = ln1.eps
            if (f_w is None or o_w is None or (q_lora and q_b_w is None)
                    or not _f32(ln1.weight, ln2.weight, attn.kv_a_layernorm.weight, fa.bias, attn.o_proj.bias,
                                q_ln.weight if q_ln is not None else None)
                    or any(n.eps != eps for n in (ln2, attn.kv_a_layernorm, q_ln) if n is not None)):
                return None
            row = [ln1.weight.data_ptr(), f_w.data_ptr(), _ptr(fa.bias) or 0, _ptr(q_ln.weight) if q_ln else 0,
                   _ptr(q_b_w) or 0, attn.kv_a_layernorm.weight.data_ptr(), kvb.weight.data_ptr(),
                   kvb.weight.stride(1), o_w.data_ptr(), _ptr(attn.o_proj.bias) or 0, 0, ln2.weight.data_ptr()]
            links += [(layers._modules, str(i), block)]
            links += _Stack._link(block, "self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
            links += _Stack._link(attn, *fa.names, "o_proj", "kv_b_proj", "kv_a_layernorm",
                                  *(("q_a_layernorm", "q_b_proj") if q_lora else ()))
            tensors += _Stack._weights(*fa.linears, attn.o_proj, kvb, attn.kv_a_layernorm, ln1, ln2,
                                       *((q_ln, attn.q_b_proj) if q_lora else ()))
            experts = getattr(mlp, "experts", None)
            if experts is None:  # a dense MLP layer (first_k_dense_replace)
                fm = getattr(mlp, "fused", None)
                if fm is None or type(getattr(mlp, "down_proj", None)) is not nn.Linear:
                    return None
                gu_w, down_w, I = _group(fm), _single(mlp.down_proj), mlp.down_proj.in_features
                packs += [gu_w, down_w]
                if gu_w is None or down_w is None or I % 8:
                    return None
                row += [0, gu_w.data_ptr(), down_w.data_ptr(), I, 0, 0, 0, 0, 0, 0, 0, 0]
                links += _Stack._link(mlp, *fm.names, "down_proj")
                tensors += _Stack._weights(*fm.linears, mlp.down_proj)
            else:
                gate, shared = mlp.gate, getattr(mlp, "shared_experts", None)
                stacks = experts.__dict__.get("packed_stacks")
                bias = gate.e_score_correction_bias if gate.use_bias else None
                E, I2, _ = experts.gate_up_proj.shape
                I, Is, sgu = I2 // 2, 0, None
                if (stacks is None or not _f32(experts.gate_up_proj, experts.down_proj, gate.weight, bias) or I % 8
                        or gate.scoring_func not in ("sigmoid", "softmax") or gate.n_group > 64
                        or (gate.n_group > 1 and E % gate.n_group)):
                    return None
                if shared is not None:
                    fs = getattr(shared, "fused", None)
                    sgu, sdown = _group(fs), _single(shared.down_proj)
                    packs += [sgu, sdown]
                    Is = shared.down_proj.in_features
                    if sgu is None or sdown is None or Is % 8:
                        return None
                    links += _Stack._link(shared, *fs.names, "down_proj")
                    tensors += _Stack._weights(*fs.linears, shared.down_proj)
                gu_w, gu_stride = stacks[0].get(experts.gate_up_proj)
                down_w, down_stride = stacks[1].get(experts.down_proj)
                row += [1, gu_w.data_ptr(), down_w.data_ptr(), I, gu_stride, down_stride, gate.weight.data_ptr(),
                        _ptr(bias) or 0, _ptr(sgu) or 0, _ptr(sdown) if sgu is not None else 0, Is, 0]
                links += _Stack._link(mlp, "gate", "experts", "shared_experts")
                tensors += [experts.gate_up_proj, experts.down_proj, gate.weight] + ([bias] if bias is not None else [])
                moes.append(mlp)
                here = (E, gate.top_k, gate.n_group, gate.topk_group, int(gate.scoring_func == "softmax"),
                        int(gate.norm_topk_prob), gate.routed_scaling_factor)
                if moe_dims not in (None, here):
                    return None
                moe_dims = here
            here = (Nfq, H, NOPE, R, V, C, int(model.rotary.interleave), eps, attn.scale)
            if attn_dims not in (None, here):
                return None
            attn_dims = here
            rows.append(row)
        if not rows:
            return None
        dims = (attn_dims, moe_dims or (0, 0, 1, 1, 0, 0, 1.0))  # no MoE layer: no routing
        ends = _Stack._ends(model)
        return MLAStack(links + ends[0], tensors + ends[1], torch.tensor(rows, dtype=torch.int64), dims, moes,
                        packs=packs)

    def bind(self, cache, B: int) -> int | None:
        """Point the plan at `cache` (B rows); its slots per row, or None where it does not fit."""
        c0 = cache.layers[0]
        if not torch.is_tensor(c0) or c0.shape[0] != B:
            return None
        key = tuple((t.data_ptr(), t.shape, t.stride()) for t in cache.layers)
        if key != self.cache_key:
            for i, layer in enumerate(cache.layers):
                if not torch.is_tensor(layer) or not _f32(layer) or layer.shape != c0.shape:
                    return None
                self.ptrs[i, 10] = layer.data_ptr()
            self.cache_key = key
        return c0.shape[1]

    def step(self, io, kv_len: int) -> int:
        (*_, eps, scale), (*_, scaling) = self.dims
        return library().r1_mla_decode_step(ctypes.byref(io), len(self.ptrs), self.ptrs.data_ptr(),
                                            self.dims_c.data_ptr(), eps, scale, scaling, kv_len,
                                            torch.get_num_threads())

    def run(self, h, cos, sin, cache, slots, kv_len) -> bool:
        B, _, Hd = h.shape
        S = self.bind(cache, B)
        if S is None:
            return False
        (_, _, _, R, _, _, _, eps, scale), (*_, scaling) = self.dims
        cos, sin = cos.reshape(B, R // 2).contiguous(), sin.reshape(B, R // 2).contiguous()
        bad = library().r1_mla_decode_stack(h.data_ptr(), B, Hd, len(self.ptrs), self.ptrs.data_ptr(), self.dims_c.data_ptr(),
                                            eps, scale, scaling, cos.data_ptr(), sin.data_ptr(), S, slots.data_ptr(),
                                            kv_len, torch.get_num_threads())
        _check(bad, slots, S)
        return True


def decode_stack(model, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, slots: torch.Tensor,
                 kv_len: int) -> torch.Tensor | None:
    """Every block of `model` for one new token per row, h (B, 1, hidden) -> (B, 1, hidden), in one C
    call (DenseStack, MLAStack), in place on h; None where it does not apply (the caller runs the
    blocks one by one, each through `decode_block` or torch): where `decode_block` would not run,
    layers that differ in shape, a MoE in training mode."""
    if (not FUSED_LAYERS or not STACKED or torch.compiler.is_compiling() or h.device.type != "cpu"
            or h.dtype != torch.float32 or h.shape[1] != 1 or h.shape[0] > MAX_ROWS or kv_len is None or slots is None
            or torch.is_grad_enabled() or not h.is_contiguous() or len(cache.layers) != len(model.model.layers)
            or library() is None):
        return None
    stack = _plan(model)
    if stack is None:
        return None
    with stack.lock:
        return h if stack.run(h, cos, sin, cache, slots.contiguous(), kv_len) else None


def _plan(model) -> "_Stack | None":
    """The model's one-call decode plan, in the mode in force (sync_mode), built again where anything
    it relies on changed; None where the model does not fit one."""
    sync_mode()
    stack = model.__dict__.get("_decode_stack")
    if stack is None or not stack.valid():
        kind = MLAStack if model.config.is_mla else DenseStack
        stack = kind.build(model)
        model.__dict__["_decode_stack"] = stack  # None: built again next step (cheap: it stops at the first misfit)
        if stack is None or not stack.valid():  # valid() also refuses a MoE in training mode
            return None
    return stack


def _swiglu_half(h: torch.Tensor, ln, mlp) -> bool:
    """h += mlp(ln(h)) in place, in C; False (h untouched) where it does not apply."""
    I = mlp.down_proj.in_features
    gu_w, down_w = _group(mlp.fused), _single(mlp.down_proj)
    if I % 8 or gu_w is None or down_w is None:
        return False
    B, _, Hd = h.shape
    library().r1_swiglu_block(h.data_ptr(), B, Hd, ln.weight.data_ptr(), ln.eps, gu_w.data_ptr(),
                              down_w.data_ptr(), I, torch.get_num_threads())
    return True


def _moe_half(h: torch.Tensor, ln, moe) -> bool:
    """h += moe(ln(h)) in place: routing in torch (moe.Router, the same choices), the experts' and the
    shared experts' products in C; False (h untouched) where it does not apply."""
    experts, shared = getattr(moe, "experts", None), getattr(moe, "shared_experts", None)
    stacks = None if experts is None else experts.__dict__.get("packed_stacks")
    if stacks is None or moe.training or not _f32(experts.gate_up_proj, experts.down_proj):
        return False  # training-mode forwards count the experts' load: torch's MoE does that
    E, I2, _ = experts.gate_up_proj.shape
    I, Is = I2 // 2, 0
    sgu = sdown = None
    if shared is not None:
        sgu, sdown = _group(getattr(shared, "fused", None)), _single(shared.down_proj)
        Is = shared.down_proj.in_features
        if sgu is None or sdown is None or Is % 8:
            return False
    if I % 8:
        return False
    B, _, Hd = h.shape
    xn = ln(h).reshape(B, Hd).contiguous()
    ids, gates, _ = moe.gate(xn)
    gu_w, gu_stride = stacks[0].get(experts.gate_up_proj)
    down_w, down_stride = stacks[1].get(experts.down_proj)
    ids, gates = ids.contiguous(), gates.float().contiguous()
    library().r1_moe_block(h.data_ptr(), xn.data_ptr(), B, Hd, ids.data_ptr(), gates.data_ptr(), ids.shape[1],
                           gu_w.data_ptr(), gu_stride, down_w.data_ptr(), down_stride, I, E,
                           _ptr(sgu), _ptr(sdown), Is, torch.get_num_threads())
    return True


def _mla_half(block, x, rotary, cos, sin, cache, slots, kv_len) -> torch.Tensor | None:
    """x + attention(ln1(x)) of a DeepSeek block (MLA, absorbed), in C; None where it does not apply."""
    attn, ln1 = block.self_attn, block.input_layernorm
    B, _, Hd = x.shape
    C, R, NOPE, V, H = attn.kv_lora_rank, attn.rope_dim, attn.nope_dim, attn.v_dim, attn.n_heads
    Nfq = attn.fused.sizes[0]
    kvb = attn.kv_b_proj
    if (C % 8 or NOPE % 8 or V % 8 or (C + R) % 8 or R % 2 or R > 512 or (attn.q_lora_rank and Nfq % 8)
            or type(kvb) is not nn.Linear or kvb.weight.stride(0) != 1 or kvb.weight.dtype != torch.float32
            or cache.shape[0] != B or not _f32(cache, attn.kv_a_layernorm.weight)):
        return None
    f_w, o_w = _group(attn.fused), _single(attn.o_proj)
    q_b_w = _single(attn.q_b_proj) if attn.q_lora_rank else None
    if f_w is None or o_w is None or (attn.q_lora_rank and (q_b_w is None or not _f32(attn.q_a_layernorm.weight))):
        return None
    f_b = None if attn.fused.bias is None else attn.fused.bias.detach().contiguous()
    o_b = None if attn.o_proj.bias is None else attn.o_proj.bias.detach().contiguous()
    h = x.contiguous().clone()
    cos, sin = cos.reshape(B, R // 2).contiguous(), sin.reshape(B, R // 2).contiguous()
    slots = slots.contiguous()
    q_eps = attn.q_a_layernorm.eps if attn.q_lora_rank else ln1.eps
    if q_eps != ln1.eps or attn.kv_a_layernorm.eps != ln1.eps:
        return None
    bad = library().r1_mla_decode_attention(
        h.data_ptr(), B, Hd, ln1.weight.data_ptr(), ln1.eps, f_w.data_ptr(), _ptr(f_b), Nfq,
        attn.q_a_layernorm.weight.data_ptr() if attn.q_lora_rank else None, _ptr(q_b_w),
        attn.kv_a_layernorm.weight.data_ptr(), kvb.weight.data_ptr(), kvb.weight.stride(1),
        o_w.data_ptr(), _ptr(o_b), H, NOPE, R, V, C, int(rotary.interleave), cos.data_ptr(), sin.data_ptr(),
        cache.data_ptr(), cache.shape[1], slots.data_ptr(), kv_len, attn.scale, torch.get_num_threads())
    _check(bad, slots, cache.shape[1])
    return h


def _check(bad: int, slots: torch.Tensor, S: int) -> None:
    if bad:
        raise ValueError(f"decode slots {slots.tolist()} fall outside their rows of a cache of {S} slots "
                         f"per row: a position is past the cache's end")


# ---------------------------------------------------------------------------- a whole decode step in one call


class _StepIO(ctypes.Structure):
    """r1_step_io (cpu_kernels.c): what r1_*_decode_step reads and writes around the blocks."""
    _fields_ = [(name, kind) for kind, names in (
        (ctypes.c_void_p, "ids positions"), (ctypes.c_int64, "M"), (ctypes.c_void_p, "embed"),
        (ctypes.c_int64, "lde vocab"), (ctypes.c_void_p, "rope"), (ctypes.c_int64, "ldr rope_rows half S"),
        (ctypes.c_void_p, "h cos sin slots final_ln"), (ctypes.c_double, "eps"), (ctypes.c_int64, "Hd"),
        (ctypes.c_void_p, "head"), (ctypes.c_int64, "N"), (ctypes.c_void_p, "logits"), (ctypes.c_int64, "sample"),
        (ctypes.c_double, "temperature"), (ctypes.c_void_p, "u tokens logprobs")) for name in names.split()]


def _fixed_io(model, table: torch.Tensor) -> "tuple[_StepIO, torch.Tensor] | None":
    """A _StepIO with the fields that stay from step to step, and the packed head it points at; None
    where the embedding, norm, rotary table or head do not fit r1_*_decode_step (a plain bias-free head
    with a packed copy from `attach`)."""
    emb, norm, head = model.model.embed_tokens, model.model.norm, model.lm_head
    head_w, packed = ((emb.weight, model.__dict__.get("head_packed")) if head is None else
                      (head.weight, head.__dict__.get("packed_weight")) if type(head) is nn.Linear and head.bias is None
                      else (None, None))
    if (packed is None or type(emb) is not nn.Embedding or not _f32(emb.weight, norm.weight, head_w, table)
            or emb.weight.stride(1) != 1 or table.stride(1) != 1 or table.device.type != "cpu"
            or not norm.weight.shape[0] == emb.weight.shape[1] == head_w.shape[1]):
        return None
    was = _BF16[0]
    sync_mode(False)  # the head multiplies in float32 (bf16 logits would round every log-probability)
    head_buf = packed._packed(head_w)
    if was:
        sync_mode()
    return _StepIO(embed=emb.weight.data_ptr(), lde=emb.weight.stride(0), vocab=emb.weight.shape[0],
                   rope=table.data_ptr(), ldr=table.stride(0), rope_rows=table.shape[0], half=table.shape[1] // 2,
                   final_ln=norm.weight.data_ptr(), eps=norm.eps, Hd=emb.weight.shape[1], head=head_buf.data_ptr(),
                   N=head_w.shape[0]), head_buf


def decode_step(model, input_ids: torch.Tensor, positions: torch.Tensor, cache, kv_len: int,
                temperature: float | None = None, generator=None):
    """model(input_ids, positions=positions, cache=cache, kv_len=kv_len) for one new token per row,
    embedding to logits in one C call (r1_dense_decode_step, r1_mla_decode_step around the decode
    plan); (B, 1, V) logits, or None where it does not apply (the caller runs the model).

    With a `temperature` (0: greedy) it also picks each row's next token as engine.sample does with
    that temperature and nothing else (no top-k, top-p or min-p), drawing the same one uniform number
    per row from `generator`, and returns (tokens (B,), logprobs (B,)) instead: a step then runs no
    torch op on its (B, V) logits, each of which would start with caches the blocks left cold."""
    if (not FUSED_LAYERS or not STACKED or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or input_ids.device.type != "cpu" or input_ids.dim() != 2 or input_ids.shape[1] != 1
            or input_ids.shape[0] > MAX_ROWS or positions.shape != input_ids.shape or library() is None):
        return None
    stack = _plan(model)
    S = cache.max_seq_len
    io = stack.step_io(model, S) if stack is not None else None
    if io is None:
        return None
    B = input_ids.shape[0]
    ids, pos = input_ids.reshape(-1), positions.reshape(-1)
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    if pos.dtype != torch.int64 or not pos.is_contiguous():
        pos = pos.to(torch.int64).contiguous()
    with stack.lock:
        if stack.bind(cache, B) != S:
            return None
        h, rope, slots, logits = stack.scratch(B, io.half)
        if temperature is None:
            logits = torch.empty(B, 1, io.N)  # returned: not the scratch one
        else:
            tokens, logprobs = torch.empty(B, dtype=torch.int64), torch.empty(B)
            io.tokens, io.logprobs = tokens.data_ptr(), logprobs.data_ptr()
            io.sample, io.temperature = (2 if temperature == 0 else 1), temperature
            if temperature != 0:  # as engine._draw: one number per row, from the same generator
                u = torch.rand(B, 1, generator=generator)
                io.u = u.data_ptr()
        io.ids, io.positions, io.M, io.S = ids.data_ptr(), pos.data_ptr(), B, S
        io.h, io.cos, io.sin, io.slots, io.logits = (h.data_ptr(), rope[0].data_ptr(), rope[1].data_ptr(),
                                                     slots.data_ptr(), logits.data_ptr())
        bad = stack.step(io, kv_len)
        io.sample = 0
    if bad:
        if bad == 2:
            raise IndexError(f"token ids {ids.tolist()} outside the vocabulary of {io.vocab}")
        if bad == 3:
            raise ValueError(f"positions {pos.tolist()} outside the cache ({S} slots per row)")
        _check(bad, pos + torch.arange(B) * S, S)
    return logits if temperature is None else (tokens, logprobs)


# ---------------------------------------------------------------------------- SwiGLU for training


def _plain(*tensors) -> bool:
    """Plain tensors (or None): the C kernels read their memory, which a tensor subclass (a DTensor
    shard under FSDP or tensor parallelism) does not hold whole."""
    return all(t is None or type(t) in (torch.Tensor, nn.Parameter) for t in tensors)


SWIGLU_MIN_ELEMENTS = 1 << 12  # below, torch's two ops cost less than a call (about 4 us)


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up; `up` None: gate is a gate|up product and its two halves are the operands. On a
    CPU in float32 (outside torch.compile, which fuses it itself) one C pass forward and one backward
    (r1_swiglu_forward / _backward) instead of torch's silu, product and their backward ops, and a
    gate|up product gets its gradient as one tensor (chunk's backward would copy the halves into one)."""
    if up is None:
        half = gate.shape[-1] // 2
        g_, u_ = gate[..., :half], gate[..., half:]
    else:
        g_, u_ = gate, up
    if (g_.numel() < SWIGLU_MIN_ELEMENTS or not _plain(gate, up) or torch.compiler.is_compiling()
            or gate.device.type != "cpu" or gate.dtype != torch.float32 or u_.dtype != torch.float32
            or g_.shape != u_.shape or g_.stride(-1) != 1 or u_.stride(-1) != 1 or library() is None):
        return torch.nn.functional.silu(g_) * u_
    return _SwiGLU.apply(gate, up)


def _row_view(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, cols) with unit column stride, a view where the layout allows one."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        lib, nt = library(), torch.get_num_threads()
        if up is None:
            both = _row_view(gate)
            half = both.shape[1] // 2
            g, u = both[:, :half], both[:, half:]
        else:
            g, u = _row_view(gate), _row_view(up)
        M, N = g.shape
        h = torch.empty(M, N, dtype=torch.float32)
        lib.r1_swiglu_forward(g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), M, N, h.data_ptr(), N, nt)
        ctx.save_for_backward(g, u)
        ctx.shapes = (gate.shape, None if up is None else up.shape)
        return h.view(*gate.shape[:-1], N)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        lib, nt = library(), torch.get_num_threads()
        M, N = g.shape
        dh2 = _row_view(dh)
        if ctx.shapes[1] is None:  # one gate|up tensor: its gradient as one
            dgu = torch.empty(M, 2 * N, dtype=torch.float32)
            dg, du = dgu[:, :N], dgu[:, N:]
        else:
            dg, du = torch.empty(M, N, dtype=torch.float32), torch.empty(M, N, dtype=torch.float32)
        lib.r1_swiglu_backward(g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), dh2.data_ptr(), dh2.stride(0),
                               M, N, dg.data_ptr(), dg.stride(0), du.data_ptr(), du.stride(0), nt)
        if ctx.shapes[1] is None:
            return dgu.view(ctx.shapes[0]), None
        return dg.view(ctx.shapes[0]), du.view(ctx.shapes[1])


# ---------------------------------------------------------------------------- RMSNorm for training

RMS_NORM_MIN_ELEMENTS = 1 << 10  # below, F.rms_norm's cost is no more than a call's


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (N,), weight, eps) for float32 on a CPU in one C pass (r1_rms_norm_forward) and one
    backward (r1_rms_norm_backward): torch's CPU rms_norm runs as five ops, its backward as more. Elsewhere
    (other dtypes, devices, torch.compile, tiny inputs) F.rms_norm itself."""
    if (x.numel() < RMS_NORM_MIN_ELEMENTS or not _plain(x, weight) or torch.compiler.is_compiling()
            or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or weight.device.type != "cpu" or x.stride(-1) != 1 or library() is None):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _row_view(x)
        M, N = x2.shape
        w = weight.detach().contiguous()
        y = torch.empty(M, N, dtype=torch.float32)
        rstd = torch.empty(M, dtype=torch.float32)
        library().r1_rms_norm_forward(x2.data_ptr(), x2.stride(0), M, N, w.data_ptr(), eps, y.data_ptr(), N,
                                      rstd.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = _row_view(dy)
        dx = torch.empty(M, N, dtype=torch.float32)
        dw = torch.empty(N, dtype=torch.float32)
        library().r1_rms_norm_backward(x2.data_ptr(), x2.stride(0), dy2.data_ptr(), dy2.stride(0), M, N, w.data_ptr(),
                                       rstd.data_ptr(), dx.data_ptr(), N, dw.data_ptr(), torch.get_num_threads())
        return dx.view(ctx.x_shape), dw, None


# ---------------------------------------------------------------------------- rotary embedding for training

ROPE_MIN_ELEMENTS = 1 << 10  # below, torch's few small ops cost no more than a call


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor | None:
    """layers.Rotary.apply in one C pass each way (r1_rope), for float32 on a CPU where x is (B, T, H, D)
    and cos, sin (B, T, 1, D / 2); None where it does not apply (the caller runs torch's ops), e.g. under
    torch.compile, which fuses them itself. torch's version: four products, two sums and a cat forward,
    as many backward."""
    if (x.numel() < ROPE_MIN_ELEMENTS or not _plain(x, cos, sin) or torch.compiler.is_compiling()
            or x.device.type != "cpu" or x.dtype != torch.float32 or cos.dtype != torch.float32
            or x.dim() != 4 or cos.dim() != 4 or cos.shape[:2] != x.shape[:2] or cos.shape[2] != 1 or x.stride(-1) != 1 or library() is None):
        return None
    return _Rope.apply(x, cos, sin, interleave)


def _rows3(t: torch.Tensor) -> torch.Tensor:
    """(B, T, H, D) as (B * T, H, D) with unit stride along D: a view where the layout allows one."""
    t3 = t.reshape(-1, *t.shape[2:])
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleave):
        x3 = _rows3(x)
        c, s = _row_view(cos), _row_view(sin)
        if c.stride(0) != s.stride(0):
            c, s = c.contiguous(), s.contiguous()
        R, H, D = x3.shape
        y = torch.empty(R, H, D, dtype=torch.float32)
        library().r1_rope(x3.data_ptr(), R, H, D, x3.stride(0), x3.stride(1), c.data_ptr(), s.data_ptr(), c.stride(0),
                          int(interleave), 0, y.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(c, s)
        ctx.interleave, ctx.x_shape = interleave, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        c, s = ctx.saved_tensors
        d3 = _rows3(dy).contiguous()
        R, H, D = d3.shape
        dx = torch.empty(R, H, D, dtype=torch.float32)
        library().r1_rope(d3.data_ptr(), R, H, D, H * D, D, c.data_ptr(), s.data_ptr(), c.stride(0),
                          int(ctx.interleave), 1, dx.data_ptr(), torch.get_num_threads())
        return dx.view(ctx.x_shape), None, None, None


# ---------------------------------------------------------------------------- cross-entropy for training

CROSS_ENTROPY_MIN_ELEMENTS = 1 << 12  # below, torch's ops cost no more than a call


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(logits, targets, reduction="none") for (N, V) float32 logits on a CPU in one C pass
    each way (r1_xent_forward / _backward) instead of log_softmax, nll_loss and their backward (a zero fill of
    the logits' size among them). Elsewhere F.cross_entropy itself."""
    if (logits.numel() < CROSS_ENTROPY_MIN_ELEMENTS or not _plain(logits, targets) or torch.compiler.is_compiling()
            or logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2
            or targets.dtype != torch.int64 or targets.shape != logits.shape[:1] or library() is None):
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return _CrossEntropy.apply(logits, targets)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        x, t = logits.contiguous(), targets.contiguous()
        N, V = x.shape
        loss, lse = torch.empty(N, dtype=torch.float32), torch.empty(N, dtype=torch.float32)
        if library().r1_xent_forward(x.data_ptr(), N, V, t.data_ptr(), loss.data_ptr(), lse.data_ptr(),
                                     torch.get_num_threads()):
            bad = t[(t < 0) | (t >= V)][:5].tolist()
            raise IndexError(f"cross_entropy: target ids {bad} outside the vocabulary of {V} logits")
        ctx.save_for_backward(x, t, lse)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        x, t, lse = ctx.saved_tensors
        N, V = x.shape
        dl = dloss.contiguous()
        dx = torch.empty(N, V, dtype=torch.float32)
        library().r1_xent_backward(x.data_ptr(), N, V, t.data_ptr(), lse.data_ptr(), dl.data_ptr(), dx.data_ptr(),
                                   torch.get_num_threads())
        return dx, None
