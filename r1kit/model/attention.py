"""Attention: grouped-query attention (Qwen2, Llama) and Multi-head Latent Attention (DeepSeek).

Cache convention, shared by both: a layer's cache holds one row per sequence and one slot per
position. A new token at position p of row b goes to slot p of row b (its slot == its rope
position); the model passes those slots flattened (`cache_slots`) and a mask by which a query at
position p attends to slots 0..p of its own row. Rows are independent, which is what continuous
batching needs.

MLA caches only the compressed latent c_kv and the shared rope key per token (kv_lora_rank +
qk_rope_head_dim numbers) and attends against it directly with the up-projections absorbed:
    q_nope . (W_uk c)  =  (W_uk^T q_nope) . c          (keys never expanded)
    softmax(...) (W_uv c)  =  W_uv (softmax(...) c)    (values never expanded)
Training (no cache) uses the plain "naive" form, which is cheaper when every position is a query.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.model.config import ModelConfig
from r1kit.model import cpu_attention
from r1kit.model.cpu_attention import causal_attention
from r1kit.model.cpu_kernels import project
from r1kit.model.layers import RMSNorm, Rotary, softmax_scale


# Compiled MLA training on a CPU: up to this length the unpadded math path (matmuls plus inductor's
# fused mask and softmax) beats the flash kernel on V padded to the query's head size. Forward and
# backward, B=8, H=4, q 48 / v 32 dims, 2 threads, this project's CPU: math 1.4-1.6x faster at T=64-96,
# 1.2-1.5x at 128-192, 0.9-1.4x at 256; slower from 512 on (0.68x, then 0.42x at 1024), where its
# T x T scores dominate.
MATH_PATH_MAX_LEN = 256


# Decoding on a CPU with at least this many query heads per KV head (R1-Distill-Qwen-1.5B: 6,
# -7B: 7, -Llama-8B: 4), attend() folds each KV head's query heads into one head's query rows: SDPA's
# CPU kernel then runs one problem per KV head instead of one per query head. Decode attention alone,
# 1 thread, this project's CPU: 1.3-2.7x faster at 4-7 heads per KV head (S = 300-2000), within
# noise either way at 2-3 (0.8-1.5x), so those keep enable_gqa.
FOLD_MIN_GROUP = 4


def cache_slots(positions: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """positions (B, T) -> the flat index row * max_seq_len + position of each new token, computed
    once per forward and shared by every layer's cache write."""
    rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
    return (rows * max_seq_len + positions).reshape(-1)


def write_cache(buffer: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """buffer (B, S, ...) at flat slots (see cache_slots) = values (B, T, ...): one index_copy_."""
    rest = buffer.shape[2:]
    values = values.reshape(-1, *rest)
    if values.dtype != buffer.dtype:
        values = values.to(buffer.dtype)
    if buffer.is_contiguous():
        buffer.view(-1, *rest).index_copy_(0, slots, values)
    else:  # a strided view of a bigger cache
        S = buffer.shape[1]
        buffer[slots // S, slots % S] = values


def attend(q, k, v, mask, scale, gqa: bool) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, Dv). mask None means causal over T."""
    causal = mask is None and q.shape[2] > 1
    if gqa and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        B, H, T, D = q.shape
        if T == 1 and rep >= FOLD_MIN_GROUP and q.device.type == "cpu" and v.shape[-1] == D:
            # decoding one token: the `rep` query heads of a KV head become `rep` query rows of one head
            # (the mask, (B, 1, 1, S), is the same for all of them), one SDPA problem per KV head
            out = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], rep, D), k, v, attn_mask=mask, scale=scale)
            return out.reshape(B, H, 1, D)
        # SDPA's own grouping, not keys and values expanded to every query head: forward and backward
        # 1.0-1.66x faster (1 thread) and 1.14-1.36x (2 threads) on training's shapes, causal and padded
        # (bench/attention_gqa.py, torch 2.13, this project's CPU); MLA's one latent head, no gradient:
        # within 5% either way
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


class GQAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.attn_head_dim
        qkv_bias = config.attention_bias
        o_bias = config.attention_bias and config.model_type == "llama"
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.scale = self.head_dim ** -0.5
        self.fused = None  # q|k|v as one product when decoding (fuse.py)

    def new_cache(self, batch_size, max_seq_len, dtype, device):
        shape = (batch_size, max_seq_len, self.n_kv_heads, self.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x, rotary: Rotary, cos, sin, mask=None, cache=None, slots=None, kv_len=None):
        B, T, _ = x.shape
        fused = self.fused is not None and self.fused.usable()  # q|k|v as one product (after fuse.py)
        if fused:
            qk, v = self.fused(x).split([(self.n_heads + self.n_kv_heads) * self.head_dim,
                                         self.n_kv_heads * self.head_dim], dim=-1)
            qk = qk.view(B, T, self.n_heads + self.n_kv_heads, self.head_dim)
            q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        else:
            q, k, v = project(self.q_proj, x), project(self.k_proj, x), project(self.v_proj, x)
            q, k = q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if cache is None and mask is None:  # training on a CPU: rotation and attention in one kernel
            out = causal_attention(q, k, v, self.scale, rope=(cos, sin, rotary.interleave))
            if out is not None:
                return project(self.o_proj, out.view(B, T, -1))
        if fused:  # one rotation for q and k together
            q, k = rotary.apply(qk, cos, sin).split([self.n_heads, self.n_kv_heads], dim=2)
        else:
            q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache
            write_cache(k_cache, slots, k)
            write_cache(v_cache, slots, v)
            k, v = k_cache[:, :kv_len], v_cache[:, :kv_len]
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale, gqa=True)
        return project(self.o_proj, out.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3), names as in the Hugging Face checkpoints."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        bias = config.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(config.hidden_size, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, config.hidden_size, bias=bias)
        self.scale = softmax_scale(config, qk_dim)
        self.fused = None  # q_a|kv_a (or q|kv_a) as one product when decoding (fuse.py)

    def new_cache(self, batch_size, max_seq_len, dtype, device):
        # one tensor per layer: [c_kv | k_rope] per slot; keys read it whole, values its first part
        return torch.zeros(batch_size, max_seq_len, self.kv_lora_rank + self.rope_dim, dtype=dtype, device=device)

    def cache_numel_per_token(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def forward(self, x, rotary: Rotary, cos, sin, mask=None, cache=None, slots=None, kv_len=None):
        B, T, _ = x.shape
        q_in = self.q_a_proj if self.q_lora_rank else self.q_proj
        if self.fused is not None and self.fused.usable():
            q, kv = self.fused(x).split(self.fused.sizes, dim=-1)
        else:
            q, kv = project(q_in, x), project(self.kv_a_proj_with_mqa, x)
        if self.q_lora_rank:
            q = project(self.q_b_proj, self.q_a_layernorm(q))
        c_kv, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        if cache is None and mask is None and cpu_attention.usable(q, T):  # training on a CPU: q whole, rotated inside
            kv_b = project(self.kv_b_proj, c_kv).view(B, T, self.n_heads, self.nope_dim + self.v_dim)
            out = causal_attention(q.view(B, T, self.n_heads, -1), kv_b[..., : self.nope_dim], kv_b[..., self.nope_dim:],
                                   self.scale, k2=k_rope.unsqueeze(2), rope=(cos, sin, rotary.interleave), kv=kv_b)
            if out is not None:
                return project(self.o_proj, out.view(B, T, self.n_heads * self.v_dim))
        q_nope, q_rope = q.view(B, T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = rotary.apply(q_rope, cos, sin)
        k_rope = rotary.apply(k_rope.unsqueeze(2), cos, sin)  # (B, T, 1, rope_dim): shared by heads
        if cache is None:
            out = self._naive(q_nope, q_rope, c_kv, k_rope, mask)
        elif T > 1 and torch.is_grad_enabled():
            # training through a cache (GRPO's update continuing from its prompt pass): many queries per
            # cached key, so expanding the keys (as without a cache) is cheaper than absorbing W_uk and
            # W_uv into every query, whose attention then runs at the latent's width
            write_cache(cache, slots, torch.cat((c_kv, k_rope.squeeze(2)), dim=-1))
            latent = cache[:, :kv_len]
            out = self._naive(q_nope, q_rope, latent[..., : self.kv_lora_rank],
                              latent[..., self.kv_lora_rank:].unsqueeze(2), mask)
        else:
            out = self._absorbed(q_nope, q_rope, c_kv, k_rope, mask, cache, slots, kv_len)
        return project(self.o_proj, out.reshape(B, T, self.n_heads * self.v_dim))

    def _naive(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Keys and values expanded from the latent c_kv (B, S, C) and the shared rope key (B, S, 1, R)
        of S positions; the queries are the last T of them (T = S without a cache)."""
        B, S = c_kv.shape[:2]
        T = q_nope.shape[1]
        kv = project(self.kv_b_proj, c_kv).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, -1, self.n_heads, -1)), dim=-1)
        pad = q.shape[-1] - self.v_dim
        if pad > 0 and q.device.type == "cpu" and not (torch.compiler.is_compiling() and T <= MATH_PATH_MAX_LEN):
            # CPU's flash kernel needs one head size; else SDPA takes the slower math path. Zero columns
            # of V give zero outputs. Compiled, inductor fuses the math path's mask and softmax, which
            # beats the padded flash kernel on short sequences (see MATH_PATH_MAX_LEN).
            v = F.pad(v, (0, pad))
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale, gqa=False)
        return out.transpose(1, 2)[..., : self.v_dim]  # (B, T, H, v_dim)

    def absorbed_weights(self):
        w = self.kv_b_proj.weight.unflatten(0, (self.n_heads, self.nope_dim + self.v_dim))
        return w[:, : self.nope_dim], w[:, self.nope_dim:]  # W_uk (H, nope, C), W_uv (H, v, C)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask, cache, slots, kv_len):
        write_cache(cache, slots, torch.cat((c_kv, k_rope.squeeze(2)), dim=-1))
        latent = cache[:, :kv_len].unsqueeze(1)  # (B, 1, S, C + R): one "head" shared by all
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk.to(q_nope.dtype))
        query = torch.cat((q_latent, q_rope.transpose(1, 2)), dim=-1)  # (B, H, T, C + R)
        # The value is the latent's c_kv part. On a CPU the whole latent goes in (its rope columns give
        # output columns that are dropped): one head size, so SDPA takes its fused kernel (and decoding
        # its query-head folding) instead of the math fallback, which cost a tiny V3 model over half its
        # decode time. GPUs keep the exact value width (their kernel choice was measured with it).
        value = latent if latent.device.type == "cpu" else latent[..., : self.kv_lora_rank]
        out = attend(query, latent, value, mask, self.scale, gqa=True)[..., : self.kv_lora_rank]  # (B, H, T, C)
        return torch.einsum("bhtc,hvc->bthv", out, w_uv.to(out.dtype))
