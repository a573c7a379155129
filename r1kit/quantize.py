"""Int8 weight-only quantization of linear layers (as in gpt-fast): each output channel (row) of a
weight keeps its own scale, w ~= scale[row] * int8[row]. Activations stay in the model's dtype.

    report = quantize_int8(model)      # in place; report.bytes_before / bytes_after
    print(report)

Decoding small batches is bound by reading weights, so a quarter of fp32's bytes (half of bf16's)
is what makes laptops fast. On CPU the matmul reads the int8 weight directly
(`aten._weight_int8pack_mm`); elsewhere the weight is dequantized on the fly.

Kept in full precision: embeddings (a lookup, not a matmul), MLA's `kv_b_proj` (the absorbed
attention reads its weight directly to fold it into queries and outputs), MoE experts (stacked
tensors, not nn.Linear) and the router.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SKIP_DEFAULT = ("kv_b_proj",)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device=w.device)
        weight, scales = quantize_per_channel(w)
        q.weight.copy_(weight)
        q.scales.copy_(scales.to(w.dtype))
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            flat = x.reshape(-1, self.in_features).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 weight, float32 scale per row)."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


@dataclass
class QuantizeReport:
    bytes_before: int
    bytes_after: int
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def saved_fraction(self) -> float:
        return 1 - self.bytes_after / max(self.bytes_before, 1)

    def __str__(self) -> str:
        mb = 2 ** 20
        return (f"int8: {len(self.quantized)} linear layers quantized, {len(self.skipped)} kept; weights "
                f"{self.bytes_before / mb:.1f} MiB -> {self.bytes_after / mb:.1f} MiB "
                f"({100 * self.saved_fraction:.0f}% saved)")


def model_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def quantize_int8(model: nn.Module, skip: tuple[str, ...] = SKIP_DEFAULT) -> QuantizeReport:
    """Replace every nn.Linear (but those whose name ends in one of `skip`) with an Int8Linear, in place."""
    before = model_bytes(model)
    report = QuantizeReport(before, before)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear):
                continue
            if child_name in skip:
                report.skipped.append(full)
                continue
            setattr(module, child_name, Int8Linear.from_linear(child))
            report.quantized.append(full)
    # an untied output head is a module call in the model, so it is now int8 too; a tied head
    # shares the embedding matrix and stays in full precision
    report.bytes_after = model_bytes(model)
    return report


@torch.no_grad()
def heldout_loss(model, token_ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of `token_ids` (N, T): the quality check for a quantized model."""
    losses = []
    for start in range(0, token_ids.shape[0], batch_size):
        chunk = token_ids[start:start + batch_size]
        logits = model(chunk)[:, :-1].float()
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                      reduction="sum"))
    return float(sum(losses) / (token_ids.shape[0] * (token_ids.shape[1] - 1)))


def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """`--quantize METHOD` for the CLIs: quantize in place, print the report, return the model."""
    if method != "int8":
        raise ValueError(f"quantization {method!r} is not supported; use int8")
    print(quantize_int8(model))
    return model
