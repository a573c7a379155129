"""Causal self-attention for training on a CPU, float32: cpu_kernels.c's r1_attn_forward and
r1_attn_backward as one autograd function.

Training (SFT, GRPO's update, the R1-Zero run) attends T queries over the same T positions, each
query t over keys 0..t. torch's CPU kernel for that (SDPA's flash attention) spent most of its time
outside arithmetic at the lengths and head sizes r1kit trains here, and MLA added a concatenation of
each head's two query parts and two key parts (nope | rope, the rope key shared by all heads) and
values padded to the query's width, each with a backward of its own. Here the parts go in as they
are (no concatenation, no padding, the shared rope key read by every head and its gradient summed in
place), and a head's three products forward and five backward are the packed tiles of cpu_kernels.c
over the causal half only. Numbers: bench/attention_cpu.py.

Where it does not apply (another device or dtype, a mask or a cache, torch.compile, longer sequences
than MAX_LEN, no compiled kernels) `causal_attention` returns None and the caller runs SDPA.
"""
from __future__ import annotations

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
# per layer, fwd + bwd, two runs each): kept only while they stay near the core's caches.
SAVE_P_BYTES = 512 << 10


def _heads(part: torch.Tensor, groups: int) -> int | None:
    """The head stride of a key/value part read by `groups` distinct heads: its own, 0 for a single
    head shared by all, None for a head count that fits neither."""
    if part.shape[2] == groups:
        return part.stride(2)
    return 0 if part.shape[2] == 1 else None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     q2: torch.Tensor | None = None, k2: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(q k^T * scale, causal) v over (B, T, heads, d) tensors -> (B, T, H, dv), contiguous.

    q (B, T, H, d1), k (B, T, G, d1) with H a multiple of G (grouped-query attention), v (B, T, G or 1,
    dv). With q2 (B, T, H, d2) and k2 (B, T, G or 1, d2) a head's query is q | q2 and its key k | k2 (MLA:
    nope | rope, the rope key one head for all). None where the kernel does not apply."""
    B, T, H, d1 = q.shape
    parts = (q, q2, k, k2, v)
    given = [t for t in parts if t is not None]
    if (not MIN_LEN <= T <= MAX_LEN or torch.compiler.is_compiling() or not _plain(*given)
            or any(t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 4 or t.shape[:2] != (B, T)
                   or t.stride(-1) != 1 for t in given)
            or (q2 is None) != (k2 is None) or k.shape[-1] != d1 or H % k.shape[2]
            or (q2 is not None and (q2.shape[2] != H or k2.shape[-1] != q2.shape[-1]))
            or library() is None):
        return None
    groups = k.shape[2]
    strides = [_heads(t, groups) for t in (k, k2, v) if t is not None]
    if any(s is None for s in strides) or (d1 + (0 if q2 is None else q2.shape[-1])) > 8 * library().r1_nr() \
            or v.shape[-1] > 8 * library().r1_nr():
        return None
    return _CausalAttention.apply(q, q2, k, k2, v, float(scale))


def _describe(q, q2, k, k2, v) -> tuple[torch.Tensor, int]:
    """The parts' {pointer, d, stride of b, of t, of a head} rows (cpu_kernels.c's layout) and rep, the
    query heads per key/value head."""
    H, groups = q.shape[2], k.shape[2]
    rows = []
    for t, shared_ok in ((q, False), (q2, False), (k, True), (k2, True), (v, True)):
        if t is None:
            rows.append([0, 0, 0, 0, 0])
            continue
        head = _heads(t, groups) if shared_ok else t.stride(2)
        rows.append([t.data_ptr(), t.shape[-1], t.stride(0), t.stride(1), head])
    return torch.tensor(rows, dtype=torch.int64), H // groups


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, q2, k, k2, v, scale):
        B, T, H, _ = q.shape
        desc, rep = _describe(q, q2, k, k2, v)
        lib = library()
        out = torch.empty(B, T, H, v.shape[-1], dtype=torch.float32)
        lse = torch.empty(B, H, T, dtype=torch.float32)
        Tp = -(-T // lib.r1_nr()) * lib.r1_nr()
        keep = any(ctx.needs_input_grad) and B * H * T * Tp * 4 <= SAVE_P_BYTES  # (grad mode is off in here)
        p = torch.empty(B, H, T, Tp, dtype=torch.float32) if keep else None
        if lib.r1_attn_forward(desc.data_ptr(), B, T, H, rep, scale, out.data_ptr(), lse.data_ptr(),
                               0 if p is None else p.data_ptr(), torch.get_num_threads()):
            raise ValueError(f"causal_attention: unsupported head sizes q {tuple(q.shape)}, v {tuple(v.shape)}")
        ctx.save_for_backward(q, q2, k, k2, v, out, lse, p)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, q2, k, k2, v, out, lse, p = ctx.saved_tensors
        B, T, H, d1 = q.shape
        desc, rep = _describe(q, q2, k, k2, v)
        dout = dout.contiguous()
        d2 = 0 if q2 is None else q2.shape[-1]
        dq = torch.empty(B, T, H, d1 + d2, dtype=torch.float32)
        dk = torch.empty(B, T, k.shape[2], d1, dtype=torch.float32)
        dk2 = None if k2 is None else torch.empty(B, T, k2.shape[2], d2, dtype=torch.float32)
        dv = torch.empty(B, T, v.shape[2], v.shape[-1], dtype=torch.float32)
        library().r1_attn_backward(desc.data_ptr(), B, T, H, rep, ctx.scale, out.data_ptr(), lse.data_ptr(),
                                   0 if p is None else p.data_ptr(), dout.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                                   0 if dk2 is None else dk2.data_ptr(), dv.data_ptr(), torch.get_num_threads())
        if q2 is None:
            return dq, None, dk, None, dv, None
        return dq[..., :d1], dq[..., d1:], dk, dk2, dv, None
