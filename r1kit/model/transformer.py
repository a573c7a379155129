"""The decoder: one Transformer for Qwen2, Llama and DeepSeek-V3 (MLA + MoE + multi-token prediction).

Module names follow the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`, ...), so a
checkpoint maps onto this model almost one to one (see hf.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.model.attention import GQAttention, MLAttention, cache_slots
from r1kit.model.config import ModelConfig
from r1kit.model.cpu_kernels import cross_entropy, decode_block, decode_stack, decode_step, linear, project
from r1kit.model.layers import MLP, RMSNorm, Rotary
from r1kit.model.moe import MoE


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config) if config.is_mla else GQAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, rotary, cos, sin, mask=None, cache=None, slots=None, kv_len=None):
        if cache is not None and x.shape[1] == 1:  # decoding on a CPU: C blocks where they apply
            out = decode_block(self, x, rotary, cos, sin, cache, slots, kv_len)
            if out is not None:
                return out
        x = x + self.self_attn(self.input_layernorm(x), rotary, cos, sin, mask, cache, slots, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(Block):
    """Multi-token prediction module (V3 §2.2): predicts token i+2 from the main model's hidden state
    at i and the embedding of token i+1, through one more block; embedding and output head are
    shared with the main model. Stored as layer `num_hidden_layers` in DeepSeek's checkpoints."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, next_embeds, rotary, cos, sin):
        x = project(self.eh_proj, torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        return self.shared_head.norm(super().forward(x, rotary, cos, sin))


@dataclass
class Cache:
    layers: list  # per layer: (k, v) for GQA, one latent tensor for MLA
    max_seq_len: int

    def reset(self) -> None:
        for layer in self.layers:
            for t in layer if isinstance(layer, tuple) else (layer,):
                t.zero_()


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        rope_dim = config.qk_rope_head_dim if config.is_mla else config.attn_head_dim
        self.rotary = Rotary(config, rope_dim, interleave=config.is_mla and config.rope_interleave)
        self.mtp = nn.ModuleList(
            MTPLayer(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)
        )
        self.gradient_checkpointing = False
        self.reset_parameters()

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def reset_parameters(self) -> None:
        if any(p.is_meta for p in self.parameters()):
            return
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        # scale the residual-stream outputs down with depth (GPT-2 style) for stable tiny training
        depth_scale = 1 / math.sqrt(2 * max(self.config.num_hidden_layers, 1))
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.mul_(depth_scale)

    def output_head(self, h: torch.Tensor) -> torch.Tensor:
        # float32 even within precision.bf16_matmuls: bf16 logits would round every log-probability
        if self.lm_head is not None:  # a module call, so a quantized head replaces it cleanly
            return project(self.lm_head, h, bf16=False)
        return linear(h, self.model.embed_tokens.weight, packed=self.__dict__.get("head_packed"), bf16=False)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> Cache:
        max_seq_len = max_seq_len or self.config.max_position_embeddings
        p = next(self.parameters())
        dtype = dtype or (p.dtype if p.is_floating_point() else torch.float32)
        device = device or p.device
        layers = [blk.self_attn.new_cache(batch_size, max_seq_len, dtype, device) for blk in self.model.layers]
        return Cache(layers, max_seq_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None,
                kv_len: int | None = None, return_hidden: bool = False, logits_at: torch.Tensor | None = None):
        """input_ids (B, T) -> logits (B, T, V).

        Without a cache: a causal pass over positions 0..T-1 (training, scoring).
        With a cache: `positions` (B, T) are each token's slot; `kv_len` (optional) bounds the slots
        attended, default max(positions) + 1.
        `logits_at` (B, K) indices into T: the output head runs on those positions only and the
        logits are (B, K, V) -- a prefill needs one position per row, GRPO only the completion's;
        with a 150k vocabulary the head is most of the memory of a long forward.
        """
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs `positions` (B, T): each token's slot")
            positions = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)
        mask = slots = None
        if cache is not None:
            kv_len = kv_len or int(positions.max()) + 1
            if kv_len > cache.max_seq_len:
                raise ValueError(f"sequence of {kv_len} tokens exceeds the cache ({cache.max_seq_len} slots)")
            if T == 1 and logits_at is None and not return_hidden:  # on a CPU: embedding to logits in one C call
                logits = decode_step(self, input_ids, positions, cache, kv_len)
                if logits is not None:
                    return logits
            slots = cache_slots(positions, cache.max_seq_len)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, h.dtype, bound=cache.max_seq_len if cache is not None else None)
        # decoding on a CPU: every block in one C call where it applies (cpu_kernels.decode_stack)
        stacked = decode_stack(self, h, cos, sin, cache, slots, kv_len) if cache is not None and T == 1 else None
        if stacked is not None:
            h = stacked
        else:
            if cache is not None:  # additive, in the activations' dtype: SDPA would convert a bool mask in every layer
                visible = torch.arange(kv_len, device=input_ids.device) <= positions.unsqueeze(-1)
                mask = torch.zeros(visible.shape, dtype=h.dtype, device=h.device).masked_fill_(~visible, float("-inf"))
                mask = mask.unsqueeze(1)  # (B, 1, T, S)
            for i, block in enumerate(self.model.layers):
                layer_cache = cache.layers[i] if cache is not None else None
                if self.gradient_checkpointing and self.training:
                    h = torch.utils.checkpoint.checkpoint(block, h, self.rotary, cos, sin, mask, layer_cache,
                                                          slots, kv_len, use_reentrant=False)
                else:
                    h = block(h, self.rotary, cos, sin, mask, layer_cache, slots, kv_len)
        out = h if logits_at is None else h.gather(1, logits_at.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        logits = self.output_head(self.model.norm(out))
        return (logits, h) if return_hidden else logits

    # ------------------------------------------------------------------ training
    def loss(self, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy where loss_mask[:, 1:] is 1, plus the MTP and balance terms."""
        logits, hidden = self.forward(input_ids, return_hidden=True)
        # every position against the next token, the last one against a dummy with weight 0: the logits
        # are read in place (logits[:, :-1] would be copied, forward and backward)
        targets = F.pad(input_ids[:, 1:], (0, 1))
        mask = torch.ones_like(input_ids, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        mask = F.pad(mask[:, 1:], (0, 1))
        lm_loss = masked_cross_entropy(logits, targets, mask)
        total = lm_loss
        out = {"lm_loss": lm_loss}
        mtp_loss = torch.zeros((), device=input_ids.device)
        if len(self.mtp) and input_ids.shape[1] > 2:
            emb = self.model.embed_tokens
            h = hidden
            for depth, layer in enumerate(self.mtp, start=1):
                # position i sees h_i and the embedding of token i+depth; predicts token i+depth+1
                T = h.shape[1] - 1
                pos = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(h.shape[0], T)
                cos, sin = self.rotary.cos_sin(pos, h.dtype)
                h = layer(h[:, :-1], emb(input_ids[:, depth:depth + T]), self.rotary, cos, sin)
                tgt = input_ids[:, depth + 1:depth + 1 + T]
                n = tgt.shape[1]
                if n == 0:
                    break
                m = mask[:, depth:depth + n]
                mtp_loss = mtp_loss + masked_cross_entropy(self.output_head(h[:, :n]), tgt, m)
            mtp_loss = mtp_loss / len(self.mtp)
            total = total + self.config.mtp_loss_weight * mtp_loss
        out["mtp_loss"] = mtp_loss
        aux = sum((m.aux_loss for m in self.moe_layers() if m.aux_loss is not None), torch.zeros((), device=input_ids.device))
        out["aux_loss"] = aux
        out["loss"] = total + aux
        return out

    def moe_layers(self) -> list[MoE]:
        # the blocks' MLPs, not a walk of every module: this runs twice per training step
        return [blk.mlp for blk in (*self.model.layers, *self.mtp) if isinstance(blk.mlp, MoE)]

    def update_router_bias(self, gamma: float | None = None) -> None:
        """Auxiliary-loss-free balancing step; call after each optimizer step (no-op when dense)."""
        gamma = self.config.bias_update_speed if gamma is None else gamma
        for moe in self.moe_layers():
            moe.update_bias(gamma)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    losses = cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    mask = mask.reshape(-1).to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp_min(1.0)
