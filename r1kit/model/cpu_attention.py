"""Causal self-attention for training on a CPU, float32: cpu_kernels.c's r1_attn_forward and
r1_attn_backward as one autograd function.

Training (SFT, GRPO's update, the R1-Zero run) attends T queries over the same T positions, each
query t over keys 0..t. torch's CPU kernel for that (SDPA's flash attention) spent most of its time
outside arithmetic at the lengths and head sizes r1kit trains here, and MLA added a concatenation of
each head's two query parts and two key parts (nope | rope, the rope key shared by all heads) and
values padded to the query's width, each with a backward of its own. Here the parts go in as they
are (no concatenation, no padding, the shared rope key read by every head and its gradient summed in
place), the kernel rotates q and k itself (the rotary embedding, its gradients rotated back: no rope
ops around it), and a head's products forward and backward are the packed tiles of cpu_kernels.c over
the causal half only. Numbers: bench/attention_cpu.py (1.1-2.1x SDPA forward + backward); the tiny
DeepSeek-V3's training step 1.26-1.28x -> 1.40-1.47x transformers' with this and the MoE and loss
kernels (bench/train_step.py).

Where it does not apply (another device or dtype, a mask or a cache, torch.compile, longer sequences
than MAX_LEN, no compiled kernels) `causal_attention` returns None and the caller runs SDPA.
"""
from __future__ import annotations

import ctypes

import torch

from r1kit.model.cpu_kernels import _plain, library

# Up to this length the kernel's per-thread scratch (two T x T score matrices) stays small (8 MiB at
# 1024) and it beats SDPA (bench/attention_cpu.py); longer sequences go to SDPA's flash kernel, whose
# memory does not grow with T^2.
MAX_LEN = 1024
MIN_LEN = 2
# Forward keeps each head's probabilities P for backward (which otherwise recomputes them: a third of its
# arithmetic) while they take at most this much memory per call (B x H x T x T floats). Alone, keeping them
# made backward 1.4x faster at the tiny DeepSeek-V3's 1.2 MiB of them; inside its training step, where they
# go out to memory and back between forward and backward, recomputing was faster (attention 1.16 -> 1.06 ms
# per layer, fwd + bwd, two runs each), and on the GRPO bench's 32 x 72 buckets too (1 thread, 8.6 -> 8.0 ms);
# on its short buckets (24 x 40, 0.7 MiB of P) keeping was faster (3.4 -> 3.0 ms): kept up to 1 MiB.
SAVE_P_BYTES = 1 << 20


def _heads(part: torch.Tensor, groups: int) -> int | None:
    """The head stride of a key/value part read by `groups` distinct heads: its own, 0 for a single
    head shared by all, None for a head count that fits neither."""
    if part.shape[2] == groups:
        return part.stride(2)
    return 0 if part.shape[2] == 1 else None


def usable(x: torch.Tensor, T: int) -> bool:
    """Whether the kernel can run for activations like x over T positions (before preparing its inputs)."""
    return (MIN_LEN <= T <= MAX_LEN and x.device.type == "cpu" and x.dtype == torch.float32 and _plain(x)
            and not torch.compiler.is_compiling() and library() is not None)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     q2: torch.Tensor | None = None, k2: torch.Tensor | None = None,
                     rope: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
                     kv: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(q k^T * scale, causal) v over (B, T, heads, d) tensors -> (B, T, H, dv), contiguous.

    q (B, T, H, d), k (B, T, G, dk) with H a multiple of G (grouped-query attention), v (B, T, G or 1,
    dv). With q2 (B, T, H, d2) a query head is q | q2; with k2 (B, T, G or 1, dk2) a key head is k | k2
    (MLA: nope | rope, the rope key one head for all); query and key heads have one size.
    rope (cos, sin, interleave): the last 2 * cos.shape[-1] numbers of every query and key head are
    rotated first, as layers.Rotary.apply does (cos, sin (B or 1, T, 1, R / 2)); q, k hold them unrotated.
    kv: k and v are the two halves of this tensor's last dimension (MLA's kv_b product): its gradient
    comes back whole (no concatenation of the halves' gradients).
    None where the kernel does not apply."""
    B, T, H, _ = q.shape
    given = [t for t in (q, q2, k, k2, v) if t is not None]
    D = q.shape[-1] + (0 if q2 is None else q2.shape[-1])
    if (not MIN_LEN <= T <= MAX_LEN or torch.compiler.is_compiling() or not _plain(*given)
            or any(t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 4 or t.shape[:2] != (B, T)
                   or t.stride(-1) != 1 for t in given)
            or k.shape[-1] + (0 if k2 is None else k2.shape[-1]) != D or H % k.shape[2]
            or (q2 is not None and q2.shape[2] != H) or library() is None):
        return None
    groups = k.shape[2]
    if any(_heads(t, groups) is None for t in (k, k2, v) if t is not None) or max(D, v.shape[-1]) > 8 * library().r1_nr():
        return None
    if rope is not None:
        cos, sin, _ = rope
        if (not _plain(cos, sin) or cos.dtype != torch.float32 or cos.dim() != 4 or cos.shape != sin.shape
                or cos.stride() != sin.stride() or cos.stride(-1) != 1 or cos.shape[1] != T or cos.shape[0] not in (1, B)
                or 2 * cos.shape[-1] > D):
            return None
    if kv is not None:
        dk = k.shape[-1]
        if (kv.shape[:3] != k.shape[:3] or kv.shape[-1] != dk + v.shape[-1] or v.shape[2] != k.shape[2]
                or k.stride() != kv.stride() or v.stride() != kv.stride() or k.data_ptr() != kv.data_ptr()
                or v.data_ptr() != kv.data_ptr() + dk * kv.element_size() or not _plain(kv)):
            return None
        k, v = kv, None
    cos, sin, interleave = rope if rope is not None else (None, None, False)
    return _CausalAttention.apply(q, q2, k, k2, v, cos, sin, float(scale), bool(interleave),
                                  None if kv is None else dk)


def _int64s(*values) -> ctypes.Array:
    """A C array of int64 (a small argument block: building a torch tensor for it cost more)."""
    return (ctypes.c_int64 * len(values))(*values)


def _describe(q, q2, k, k2, v) -> tuple[ctypes.Array, int]:
    """The parts' {pointer, d, stride of b, of t, of a head} rows (cpu_kernels.c's layout) and rep, the
    query heads per key/value head."""
    H, groups = q.shape[2], k.shape[2]
    rows = []
    for t, shared_ok in ((q, False), (q2, False), (k, True), (k2, True), (v, True)):
        if t is None:
            rows += (0, 0, 0, 0, 0)
            continue
        head = _heads(t, groups) if shared_ok else t.stride(2)
        rows += (t.data_ptr(), t.shape[-1], t.stride(0), t.stride(1), head)
    return _int64s(*rows), H // groups


def _rope_args(cos, sin, interleave):
    """cpu_kernels.c's rotary arguments: pointers and {stride of b, of t, R, interleave}"""
    if cos is None:
        return None, None, _int64s(0, 0, 0, 0)
    sb = cos.stride(0) if cos.shape[0] > 1 else 0
    return cos.data_ptr(), sin.data_ptr(), _int64s(sb, cos.stride(1), 2 * cos.shape[-1], int(interleave))


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, q2, k, k2, v, cos, sin, scale, interleave, split):
        kk, vv = (k[..., :split], k[..., split:]) if split is not None else (k, v)
        B, T, H, _ = q.shape
        desc, rep = _describe(q, q2, kk, k2, vv)
        lib = library()
        out = torch.empty(B, T, H, vv.shape[-1], dtype=torch.float32)
        lse = torch.empty(B, H, T, dtype=torch.float32)
        Tp = -(-T // lib.r1_nr()) * lib.r1_nr()
        keep = any(ctx.needs_input_grad) and B * H * T * Tp * 4 <= SAVE_P_BYTES  # (grad mode is off in here)
        p = torch.empty(B, H, T, Tp, dtype=torch.float32) if keep else None
        c, s, rs = _rope_args(cos, sin, interleave)
        if lib.r1_attn_forward(ctypes.addressof(desc), B, T, H, rep, scale, c, s, ctypes.addressof(rs), out.data_ptr(),
                               lse.data_ptr(), 0 if p is None else p.data_ptr(), torch.get_num_threads()):
            raise ValueError(f"causal_attention: unsupported head sizes q {tuple(q.shape)}, v {tuple(vv.shape)}")
        ctx.save_for_backward(q, q2, k, k2, v, cos, sin, out, lse, p)
        ctx.scale, ctx.interleave, ctx.split = scale, interleave, split
        return out

    @staticmethod
    def backward(ctx, dout):
        q, q2, k, k2, v, cos, sin, out, lse, p = ctx.saved_tensors
        split = ctx.split
        kk, vv = (k[..., :split], k[..., split:]) if split is not None else (k, v)
        B, T, H, d1 = q.shape
        desc, rep = _describe(q, q2, kk, k2, vv)
        dout = dout.contiguous()
        d2 = 0 if q2 is None else q2.shape[-1]
        dq = torch.empty(B, T, H, d1 + d2, dtype=torch.float32)
        dk2 = None if k2 is None else torch.empty(B, T, k2.shape[2], k2.shape[-1], dtype=torch.float32)
        if split is not None:  # k | v: one gradient, its halves written in place
            dkv = torch.empty(B, T, k.shape[2], k.shape[-1], dtype=torch.float32)
            dk, dv = dkv[..., :split], dkv[..., split:]
        else:
            dk = torch.empty(B, T, kk.shape[2], kk.shape[-1], dtype=torch.float32)
            dv = torch.empty(B, T, vv.shape[2], vv.shape[-1], dtype=torch.float32)
        strides = _int64s(dk.stride(1), dk.stride(2), 0 if dk2 is None else dk2.stride(1),
                          0 if dk2 is None else dk2.stride(2), dv.stride(1), dv.stride(2))
        c, s, rs = _rope_args(cos, sin, ctx.interleave)
        library().r1_attn_backward(ctypes.addressof(desc), B, T, H, rep, ctx.scale, c, s, ctypes.addressof(rs), out.data_ptr(),
                                   lse.data_ptr(), 0 if p is None else p.data_ptr(), dout.data_ptr(), dq.data_ptr(),
                                   dk.data_ptr(), 0 if dk2 is None else dk2.data_ptr(), dv.data_ptr(),
                                   ctypes.addressof(strides), torch.get_num_threads())
        dq1, dq2 = (dq, None) if q2 is None else (dq[..., :d1], dq[..., d1:])
        if split is not None:
            return dq1, dq2, dkv, dk2, None, None, None, None, None, None
        return dq1, dq2, dk, dk2, dv, None, None, None, None, None
