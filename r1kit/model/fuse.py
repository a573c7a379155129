"""Inference weight layout: fused projections and transposed storage, without copying weights.

Decoding one token is a chain of matrix-vector products, and on a CPU two things decide their cost
besides the bytes read: how many kernels run (each costs microseconds of dispatch) and which way
the matrix lies in memory (BLAS's x @ W with W stored (in, out) streams rows of W; x @ W^T with W
stored (out, in), PyTorch's usual layout, is markedly slower for one row of x).

`prepare_for_decode(model)` rewrites the storage of a model's linear weights, in place:

- projections that read the same input (q/k/v; gate/up; MLA's q_a and kv_a) are stored as one
  (in, sum(out)) matrix, and each layer's `weight` becomes a view of its block: same name, same
  shape, same values, no extra memory. The model runs the fused matrix as one product; with
  gradients on (a trainer that also generates, GRPO) through `_FusedLinear`, whose weight gradient
  is one product too, cut into each layer's rows. Left to autograd, the gradient of such a view
  comes out transposed and is copied into each layer's own layout at every backward. An optimizer
  step writes through the views into the fused matrix.
- every other linear weight (and a tied embedding that doubles as the output head) is stored
  transposed: `w.t().contiguous().t()`, the same tensor to every reader.

A `Fused` checks on every use that each layer's weight still lives where it was put (a reload that
replaced a tensor, a quantized layer, a copy of the model): if not, the layers run one by one.
Saving is unaffected (hf.save writes contiguous copies); distributed wrappers are left alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.model import precision
from r1kit.model.updates import version


class Fused:
    """Linear layers over one input, stored as the column blocks of one (in, sum(out)) matrix.
    `parent.<name>` are the layers; they are looked up again on every use, so a layer replaced on
    the parent (a quantized one, say) switches the parent back to its layers one by one."""

    def __init__(self, parent: nn.Module, names: list[str]):
        self.parent, self.names = parent, names
        linears = [getattr(parent, n) for n in names]
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        with torch.no_grad(), torch.inference_mode(False):
            base = torch.cat([lin.weight.detach() for lin in linears]).t().contiguous()  # (in, out)
            biases = [lin.bias for lin in linears]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b.detach() if b is not None else base.new_zeros(n)
                                  for b, n in zip(biases, self.sizes)])
            start = 0
            self.offsets = []
            for lin, n, b in zip(linears, self.sizes, biases):
                lin.weight.data = base[:, start:start + n].t()
                if b is not None:
                    lin.bias.data = bias[start:start + n]
                self.offsets.append(start)
                start += n
        self.weight = base.t()  # (out, in), what F.linear takes
        self.bias = bias
        # a layer without a bias got zeros here: only valid while it still has none
        self.bias_free = [b is None for b in biases]
        self.packed = None  # a cpu_kernels.PackedWeight, when the engine packs weights (cpu_kernels.attach)

    @torch.compiler.assume_constant_result  # a compiled decode step decides once, at trace time
    def usable(self) -> bool:
        """True when every layer's weight and bias still view their block, and the product may run
        fused: without gradients, or with them in float32 on a CPU outside torch.compile and autocast
        (`_FusedLinear`; elsewhere the layers run one by one, as autograd knows them)."""
        if torch.is_grad_enabled() and (torch.compiler.is_compiling() or self.weight.device.type != "cpu"
                                        or self.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
            return False
        ptr, step = self.weight.data_ptr(), self.weight.element_size()
        for name, lin, off, no_bias in zip(self.names, self.linears, self.offsets, self.bias_free):
            if getattr(self.parent, name, None) is not lin:
                return False
            w = getattr(lin, "weight", None)
            if not isinstance(w, nn.Parameter) or w.data_ptr() != ptr + off * step or w.device != self.weight.device:
                return False
            if no_bias != (lin.bias is None):
                return False
            if not no_bias and lin.bias.data_ptr() != self.bias.data_ptr() + off * self.bias.element_size():
                return False
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            params = [lin.weight for lin in self.linears] + [lin.bias for lin in self.linears if lin.bias is not None]
            if x.requires_grad or any(p.requires_grad for p in params):
                # bf16 products within precision.bf16_matmuls; the layers' versions see optimizer steps
                key = tuple(version(lin.weight) for lin in self.linears) if precision.active(x, self.weight) else None
                return _FusedLinear.apply(x, self.weight, self.bias, key, self.sizes,
                                          [lin.bias is not None for lin in self.linears], *params)
        if self.packed is not None and self.packed.accepts(x, self.weight):
            # the layers' weights are views of the fused matrix with their own version counters:
            # an optimizer step on them is seen through theirs, not the matrix's
            return self.packed(x, self.weight, self.bias, tuple(version(lin.weight) for lin in self.linears))
        return F.linear(x, self.weight, self.bias)


class _FusedLinear(torch.autograd.Function):
    """F.linear(x, fused weight, fused bias) with gradients for the layers whose weights (and biases)
    view the fused matrix: `params` are those weights, then the biases there are. Backward is two
    products: dx = dy W, and dW = dy^T x as one (sum(out), in) matrix whose row blocks are each
    layer's gradient, contiguous, as autograd wants it for a view that is not itself dense.
    `bf16_key` (not None within precision.bf16_matmuls): the three products take bf16 operands and give
    float32 (precision.product and precision.gradients); the key tells when the weight changed."""

    @staticmethod
    def forward(ctx, x, weight, bias, bf16_key, sizes, has_bias, *params):
        ctx.sizes, ctx.has_bias, ctx.x_shape = sizes, has_bias, x.shape
        ctx.bf16 = bf16_key is not None
        if not ctx.bf16:
            ctx.save_for_backward(x.reshape(-1, x.shape[-1]), weight)
            return F.linear(x, weight, bias)
        y, saved, ctx.state = precision.product(x, weight, bias, bf16_key)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        n_weights = len(ctx.sizes)
        need_dx, need_dw = ctx.needs_input_grad[0], any(ctx.needs_input_grad[6:6 + n_weights])
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.bf16:
            dx, dw = precision.gradients(dy2, ctx.saved_tensors, ctx.state, need_dx, need_dw)
        else:
            x2, weight = ctx.saved_tensors
            dx = dy2 @ weight if need_dx else None
            dw = dy2.t() @ x2 if need_dw else None
        grads = [None] * (len(ctx.needs_input_grad) - 6)
        if dw is not None:
            grads[:n_weights] = dw.split(ctx.sizes)
        if len(grads) > n_weights:  # the biases there are, in the layers' order
            db = dy2.sum(0).split(ctx.sizes)
            grads[n_weights:] = [d for d, has in zip(db, ctx.has_bias) if has]
        return (dx.view(ctx.x_shape) if dx is not None else None, None, None, None, None, None, *grads)


def _transpose_storage(param: nn.Parameter) -> None:
    if param.dim() == 2 and param.is_contiguous():
        with torch.no_grad(), torch.inference_mode(False):
            param.data = param.data.t().contiguous().t()


def prepare_for_decode(model: nn.Module, transpose: bool = True) -> nn.Module:
    """Fuse and transpose the model's linear weights in place (see the module docstring). Safe to
    call twice; skipped under torch.distributed (DDP/FSDP own the parameters' layout).
    `transpose=False` leaves the unfused weights as they are, but MLA's kv_b_proj, which the C
    decode block reads in place: for an engine whose few-row products run on packed copies
    (model/cpu_kernels.py), which read either layout, while fused AdamW on a CPU copies every
    transposed weight at every step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return model
    if any(p.is_meta for p in model.parameters()):
        return model
    from r1kit.model.attention import GQAttention, MLAttention
    from r1kit.model.layers import MLP

    for module in model.modules():
        if getattr(module, "fused", None) is not None:
            continue
        if isinstance(module, GQAttention):
            names = ["q_proj", "k_proj", "v_proj"]
        elif isinstance(module, MLAttention):
            names = ["q_a_proj" if module.q_lora_rank else "q_proj", "kv_a_proj_with_mqa"]
        elif isinstance(module, MLP):
            names = ["gate_proj", "up_proj"]
        else:
            continue
        if all(type(getattr(module, n)) is nn.Linear for n in names):
            module.fused = Fused(module, names)
    fused_ids = {id(lin.weight) for m in model.modules() if getattr(m, "fused", None) is not None
                 for lin in m.fused.linears}
    if not transpose:
        for module in model.modules():
            if isinstance(module, MLAttention) and type(module.kv_b_proj) is nn.Linear:
                _transpose_storage(module.kv_b_proj.weight)
        return model
    for module in model.modules():
        if type(module) is nn.Linear and id(module.weight) not in fused_ids:
            _transpose_storage(module.weight)
    head = getattr(model, "lm_head", "absent")
    if head is None:  # tied: the embedding is the output head, read far more by the head
        _transpose_storage(model.model.embed_tokens.weight)
    return model
