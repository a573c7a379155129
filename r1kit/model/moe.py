"""DeepSeekMoE: shared experts plus fine-grained routed experts (V3 report §2.1.2).

    h' = u + sum_shared FFN(u) + sum_{i in topk} g_i FFN_i(u)

Routing (V3): affinity s_i = sigmoid(u . e_i). A per-expert bias b_i is added to s_i only to
*choose* the experts (group-limited: keep the best `topk_group` of `n_group` groups, scored by the
sum of each group's two best biased affinities, then the top-k inside them); the gates use the
unbiased s_i, normalised over the chosen k, times `routed_scaling_factor`. After each optimizer
step b_i moves by gamma against the expert's load (auxiliary-loss-free balancing). V2 routes by
softmax affinity with a plain top-k.

Dispatch sorts the (token, expert) pairs by expert so that each expert runs once, on exactly the
tokens routed to it; no expert ever sees a token it was not chosen for (one grouped GEMM per
projection; under torch.compile each runs as the custom op r1kit::grouped_linear with its own
backward, so a compiled forward and backward stay one graph). The pairs are a permutation of the
tokens' k copies, so dispatch and combine are gathers both ways (_PermuteRows). Within
precision.bf16_matmuls on an AMX CPU the grouped products run in bf16 on r1kit's kernels instead
(precision.grouped_linear); in float32 on a CPU each expert's whole SwiGLU runs in one thread, in one
C call for all experts each way (_ExpertsFFN; compiled, the op r1kit::experts_ffn). When decoding a few tokens without grad, each (token, expert) pair
instead gathers its expert's weights into one batched product: fewer kernels, fixed shapes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from r1kit.model import precision
from r1kit.model.config import ModelConfig
from r1kit.model.cpu_kernels import _plain, library, swiglu
from r1kit.model.layers import MLP

# One grouped GEMM over all experts: F.grouped_mm (CPU kernels since torch 2.10, CUDA SM80+). Older
# torch has only the private CUDA op; the per-expert loop is the fallback everywhere else.
_grouped_mm = getattr(F, "grouped_mm", None)
_GROUPED_CUDA_ONLY = _grouped_mm is None and hasattr(torch, "_grouped_mm")
if _GROUPED_CUDA_ONLY:
    _grouped_mm = torch._grouped_mm
# Decode batches whose (token, expert) pairs' weights fit in this many bytes gather them (a copy):
# few kernels and fixed shapes; beyond it the copy would cost more than the grouped GEMM's reads.
_GATHER_BYTES = 16 * 2**20


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.scoring_func = config.scoring_func
        self.use_bias = config.topk_method == "noaux_tc"
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        # persistent: it is part of the checkpoint (HF name `e_score_correction_bias`)
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts), persistent=self.use_bias)

    def forward(self, x: torch.Tensor):
        """x (N, hidden) -> expert ids (N, k), gate weights (N, k), affinities (N, E)."""
        with torch.autocast(x.device.type, enabled=False):  # routing in float32, under autocast too
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias.float() if self.use_bias else scores
        if 1 < self.n_group and self.topk_group < self.n_group:  # keeping every group limits nothing
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.use_bias:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.max(dim=-1).values
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.n_experts)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        expert_ids = choice.topk(self.top_k, dim=-1).indices
        gates = scores.gather(1, expert_ids)
        if self.norm_topk_prob and self.top_k > 1:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return expert_ids, gates * self.routed_scaling_factor, scores


def _grouped_swiglu(xs, gate_up_proj, down_proj, counts):
    """Every expert's SwiGLU on its run of rows of xs (sorted by expert; `counts` rows each)."""
    offsets = counts.cumsum(0).to(torch.int32)
    # eager: autograd through grouped_mm; compiled: our op (grouped_mm has no float32 fake kernel), and
    # inductor fuses the SiLU * up between the two products like any other elementwise code
    linear = grouped_linear if torch.compiler.is_compiling() else _grouped_linear
    return linear(swiglu(linear(xs, gate_up_proj, offsets)), down_proj, offsets)


def _grouped_linear(x, weight, offsets):
    """Rows offsets[e-1]:offsets[e] of x times weight[e]^T: one GEMM per expert, in one kernel."""
    return _grouped_mm(x, weight.transpose(-2, -1), offs=offsets)


# The same as an opaque op with its own backward (itself an op), so that torch.compile keeps a MoE
# model's forward and backward in one graph.
@torch.library.custom_op("r1kit::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _grouped_linear(x, weight, offsets)


@grouped_linear.register_fake
def _(x, weight, offsets):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("r1kit::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy = dy.contiguous()  # the kernels need real strides (a loss of .sum() hands down an expanded tensor)
    dx = _grouped_mm(dy, weight, offs=offsets)  # (P, in): each row's dy @ weight[e]
    dw = _grouped_mm(dy.t(), x, offs=offsets)  # (E, out, in): summed over each expert's rows
    return dx, dw


@grouped_linear_backward.register_fake
def _(dy, x, weight, offsets):
    return torch.empty_like(x), torch.empty_like(weight)


def _grouped_linear_setup(ctx, inputs, output):
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight, offsets)


def _grouped_linear_grad(ctx, dy):
    x, weight, offsets = ctx.saved_tensors
    dx, dw = grouped_linear_backward(dy, x, weight, offsets)
    return dx, dw, None


grouped_linear.register_autograd(_grouped_linear_grad, setup_context=_grouped_linear_setup)


def _rows_in_c(*tensors) -> bool:
    """Float32 rows on a CPU, contiguous, outside torch.compile, with the C kernels built: the gathers
    below run as cpu_kernels.c's r1_rows_* (one pass each, fused with the gates' product and sum)."""
    return (not torch.compiler.is_compiling() and _plain(*tensors) and library() is not None
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors))


class _PermuteRows(torch.autograd.Function):
    """rows[index // k], where `index` is a permutation of the rows' k copies and `inverse` its
    inverse (k = 1: a plain permutation). Autograd would send the gradient back through a
    scatter-add (it cannot know no row repeats); here it is the inverse gather and a sum over each
    row's k copies, vectorised and parallel where the scatter is neither (one C pass on a CPU). No
    k-fold copy of the rows is ever made."""

    @staticmethod
    def forward(rows, index, inverse, k: int = 1):
        if rows.dim() == 2 and _rows_in_c(rows):
            out = rows.new_empty(index.shape[0], rows.shape[1])
            library().r1_rows_gather(rows.data_ptr(), index.data_ptr(), k, index.shape[0], rows.shape[1],
                                     out.data_ptr(), torch.get_num_threads())
            return out
        # index_select, not rows[...]: on a CPU advanced indexing is 4-5x slower for the same gather
        return rows.index_select(0, index // k if k > 1 else index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])
        ctx.k = inputs[3] if len(inputs) > 3 else 1

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if grad.dim() == 2 and _rows_in_c(grad):
            out = grad.new_empty(inverse.shape[0] // ctx.k, grad.shape[1])
            library().r1_rows_combine(grad.data_ptr(), inverse.data_ptr(), None, out.shape[0], ctx.k, grad.shape[1],
                                      out.data_ptr(), torch.get_num_threads())
            return out, None, None, None
        grad = grad.index_select(0, inverse)
        if ctx.k > 1:
            grad = grad.view(-1, ctx.k, grad.shape[-1]).sum(dim=1)
        return grad, None, None, None


class _Combine(torch.autograd.Function):
    """sum_j gates[t, j] * ys[inverse[t k + j]]: each token's k expert outputs (ys sorted by expert),
    weighted by its gates, in one C pass each way (r1_rows_combine, _backward). The same as
    _PermuteRows, a view, a product and a sum, without the k-fold intermediate either way."""

    @staticmethod
    def forward(ctx, ys, inverse, gates):
        N, k = gates.shape
        out = ys.new_empty(N, ys.shape[1])
        library().r1_rows_combine(ys.data_ptr(), inverse.data_ptr(), gates.data_ptr(), N, k, ys.shape[1],
                                  out.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(ys, inverse, gates)
        return out

    @staticmethod
    def backward(ctx, dout):
        ys, inverse, gates = ctx.saved_tensors
        dout = dout.contiguous()
        N, k = gates.shape
        dys, dg = torch.empty_like(ys), torch.empty_like(gates)
        library().r1_rows_combine_backward(ys.data_ptr(), inverse.data_ptr(), gates.data_ptr(), dout.data_ptr(), N, k,
                                           ys.shape[1], dys.data_ptr(), dg.data_ptr(), torch.get_num_threads())
        return dys, None, dg


def _experts_shaped(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    return gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1] == xs.shape[1]


def _experts_in_c(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Float32 on a CPU with r1kit's kernels and a BLAS to hand them (cpu_kernels._torch_blas): the routed
    experts run as _ExpertsFFN. Not under torch.distributed (gloo ranks on a CPU): with it there, a rank of
    the test suite's two-rank FSDP runs died at exit ("terminate called without an active exception") in
    3 of 7 full runs, in none of 4 without it; until that is understood, ranks keep torch's products."""
    lib = library()
    return (lib is not None and lib.blas and _rows_in_c(xs, gate_up, down) and _experts_shaped(xs, gate_up, down)
            and not (dist.is_available() and dist.is_initialized()))


def _experts_forward_c(xs, gate_up, down, counts):
    """ys (P, H) and what backward reads (gu = xs W1^T (P, 2I), h = silu(g) u (P, I)): r1_experts_forward."""
    P, H = xs.shape
    E, I = down.shape[0], down.shape[2]
    gu, h, ys = xs.new_empty(P, 2 * I), xs.new_empty(P, I), xs.new_empty(P, H)
    library().r1_experts_forward(xs.data_ptr(), counts.data_ptr(), E, H, I, gate_up.data_ptr(), down.data_ptr(),
                                 gu.data_ptr(), h.data_ptr(), ys.data_ptr(), torch.get_num_threads())
    return ys, gu, h


def _experts_backward_c(dys, xs, gate_up, down, counts, gu, h):
    """(dxs, dgate_up, ddown) from dys: r1_experts_backward."""
    dys = dys.contiguous()
    P, H = xs.shape
    E, I = down.shape[0], down.shape[2]
    dx, dgate_up, ddown = torch.empty_like(xs), torch.empty_like(gate_up), torch.empty_like(down)
    dh, dgu = xs.new_empty(P, I), xs.new_empty(P, 2 * I)  # scratch
    library().r1_experts_backward(xs.data_ptr(), counts.data_ptr(), E, H, I, gate_up.data_ptr(), down.data_ptr(),
                                  gu.data_ptr(), h.data_ptr(), dys.data_ptr(), dh.data_ptr(), dgu.data_ptr(),
                                  dx.data_ptr(), dgate_up.data_ptr(), ddown.data_ptr(), torch.get_num_threads())
    return dx, dgate_up, ddown


def _experts_compiled_in_c(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """_experts_in_c's test inside a graph being traced: float32 CPU tensors and the kernel built."""
    return (_experts_kernel_built() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (xs, gate_up, down))
            and _experts_shaped(xs, gate_up, down))


class _ExpertsFFN(torch.autograd.Function):
    """Every expert's SwiGLU on its run of rows of xs (sorted by expert, counts[e] rows each): one C call
    forward (r1_experts_forward) and one backward. A thread takes whole experts and runs each one's two
    products and SwiGLU back to back on rows still in its cache; torch's path was a grouped product, a
    SwiGLU and a grouped product, each splitting every expert's product between the threads (and four
    grouped products and the SwiGLU's backward for the gradients). Same arithmetic, MKL's sgemm.
    Under torch.compile the same C calls run as the op r1kit::experts_ffn (below)."""

    @staticmethod
    def forward(ctx, xs, gate_up, down, counts):
        ys, gu, h = _experts_forward_c(xs, gate_up, down, counts)
        ctx.save_for_backward(xs, gate_up, down, counts, gu, h)
        return ys

    @staticmethod
    def backward(ctx, dys):
        return (*_experts_backward_c(dys, *ctx.saved_tensors), None)


@torch.compiler.assume_constant_result  # decided once, at trace time
def _experts_kernel_built() -> bool:
    lib = library()
    return lib is not None and bool(lib.blas)


# _ExpertsFFN as an opaque op with its own backward, for torch.compile: it returns gu and h as well,
# which its backward reads (an op keeps nothing between forward and backward but its outputs).
@torch.library.custom_op("r1kit::experts_ffn", mutates_args=())
def experts_ffn(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _experts_forward_c(xs.contiguous(), gate_up.contiguous(), down.contiguous(), counts.contiguous())


@experts_ffn.register_fake
def _(xs, gate_up, down, counts):
    I = down.shape[2]
    return xs.new_empty(xs.shape), xs.new_empty(xs.shape[0], 2 * I), xs.new_empty(xs.shape[0], I)


@torch.library.custom_op("r1kit::experts_ffn_backward", mutates_args=())
def experts_ffn_backward(dys: torch.Tensor, xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                         counts: torch.Tensor, gu: torch.Tensor,
                         h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _experts_backward_c(dys, *(t.contiguous() for t in (xs, gate_up, down, counts, gu, h)))


@experts_ffn_backward.register_fake
def _(dys, xs, gate_up, down, counts, gu, h):
    return torch.empty_like(xs), torch.empty_like(gate_up), torch.empty_like(down)


def _experts_ffn_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1], output[2])


def _experts_ffn_grad(ctx, dys, _dgu, _dh):
    return (*experts_ffn_backward(dys, *ctx.saved_tensors), None)


experts_ffn.register_autograd(_experts_ffn_grad, setup_context=_experts_ffn_setup)


def combine(ys: torch.Tensor, inverse: torch.Tensor, order: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Token t's output: sum_j gates[t, j] * ys[inverse[t k + j]], ys the (token, expert) pairs' outputs
    sorted by expert (order: the sort, inverse: its inverse)."""
    n_tokens, k = gates.shape
    if ys.dim() == 2 and _rows_in_c(ys, gates):
        return _Combine.apply(ys, inverse, gates)
    ys = _PermuteRows.apply(ys, inverse, order).view(n_tokens, k, -1)  # back to token-major pairs
    return (ys * gates.unsqueeze(-1).to(ys.dtype)).sum(dim=1)


def dispatch_plan(flat: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, expert) pairs' expert ids (P,) -> order (the pairs sorted by expert, stably), inverse
    (where each pair went: pairs are a permutation, so both ways are gathers) and counts (E,) per expert.
    On a CPU one counting pass in C (r1_moe_plan) instead of two sorts and a histogram."""
    if (flat.device.type == "cpu" and flat.dtype == torch.int64 and flat.is_contiguous() and _plain(flat)
            and not torch.compiler.is_compiling() and library() is not None):
        order, inverse = torch.empty_like(flat), torch.empty_like(flat)
        counts = torch.empty(n_experts, dtype=torch.int64)
        if library().r1_moe_plan(flat.data_ptr(), flat.numel(), n_experts, counts.data_ptr(), order.data_ptr(),
                                 inverse.data_ptr()):
            raise IndexError(f"MoE routing chose an expert outside 0..{n_experts - 1}")
        return order, inverse, counts
    order = flat.argsort(stable=True)
    inverse = order.argsort()
    # a fixed-size histogram (bincount's size depends on the data, which breaks torch.compile graphs)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    return order, inverse, counts


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        n_tokens, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        if not torch.is_grad_enabled() and n_tokens * k * self._expert_bytes() <= _GATHER_BYTES:
            return self._gathered(x, flat, gates)
        order, inverse, counts = dispatch_plan(flat, self.gate_up_proj.shape[0])
        xs = _PermuteRows.apply(x, order, inverse, k)  # row p is token order[p] // k
        gate_up, down = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(xs.device.type) and xs.is_floating_point():
            # mixed precision (SFT's bf16 on a GPU): grouped_mm is not on autocast's list, so cast as
            # autocast casts a linear; the master weights keep their dtype and get their gradients
            low = torch.get_autocast_dtype(xs.device.type)
            xs, gate_up, down = xs.to(low), gate_up.to(low), down.to(low)
        if precision.grouped_active(xs, gate_up):  # bf16 products on AMX (precision.bf16_matmuls)
            offsets = F.pad(counts.cumsum(0), (1, 0))
            ys = precision.grouped_linear(swiglu(precision.grouped_linear(xs, gate_up, offsets)), down, offsets)
        elif _experts_in_c(xs, gate_up, down):  # float32 on a CPU: each expert's whole FFN in one thread
            ys = _ExpertsFFN.apply(xs, gate_up, down, counts)
        elif torch.compiler.is_compiling() and _experts_compiled_in_c(xs, gate_up, down):
            ys = experts_ffn(xs, gate_up, down, counts)[0]
        elif self._can_group(xs):
            ys = _grouped_swiglu(xs, gate_up, down, counts)
        else:
            ys = self._loop(xs, counts.tolist())
        return combine(ys, inverse, order, gates)

    def _expert_bytes(self) -> int:
        return (self.gate_up_proj[0].numel() + self.down_proj[0].numel()) * self.gate_up_proj.element_size()

    def _gathered(self, x: torch.Tensor, flat: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Decode: pair p = (token p // k, expert flat[p]) runs with that expert's weights gathered
        (index_select: a plain copy, only while the pairs' weights are small; see _GATHER_BYTES)."""
        n_tokens, k = gates.shape
        xs = x.repeat_interleave(k, dim=0).unsqueeze(1)  # (P, 1, H): a row per pair
        gate_up = torch.index_select(self.gate_up_proj, 0, flat)  # (P, 2I, H)
        h = swiglu(torch.bmm(xs, gate_up.transpose(1, 2)))
        down = torch.index_select(self.down_proj, 0, flat)  # (P, H, I)
        ys = torch.bmm(h, down.transpose(1, 2)).squeeze(1)  # (P, H)
        return (ys.view(n_tokens, k, -1) * gates.unsqueeze(-1).to(ys.dtype)).sum(dim=1)

    def _can_group(self, xs: torch.Tensor) -> bool:
        # the grouped kernels need 16-byte aligned rows (and bf16 on CUDA)
        if _grouped_mm is None or xs.shape[0] == 0 or (xs.is_cuda and xs.dtype != torch.bfloat16):
            return False
        if _GROUPED_CUDA_ONLY and not xs.is_cuda:
            return False
        width = xs.element_size()
        return all(d * width % 16 == 0 for d in self.down_proj.shape[1:])

    def _loop(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # one unbind (not E selects): its backward stacks the per-expert gradients once
        outs, start = [], 0
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        for e, count in enumerate(counts):
            if count == 0:
                continue
            seg = xs[start:start + count]
            outs.append(F.linear(swiglu(F.linear(seg, gate_up[e])), down[e]))
            start += count
        return torch.cat(outs) if outs else xs[:0]


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None
        )
        # tokens routed to each expert since the last bias update (training only)
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        expert_ids, gates, scores = self.gate(flat)
        y = self.experts(flat, expert_ids, gates)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training:
            with torch.no_grad():
                self.expert_load.index_add_(0, expert_ids.reshape(-1), torch.ones_like(expert_ids.reshape(-1), dtype=self.expert_load.dtype))
            if self.config.aux_loss_alpha > 0:
                self.aux_loss = self._sequence_balance_loss(scores.view(B, T, -1), expert_ids.view(B, T, -1))
        return y.view(B, T, H)

    def _sequence_balance_loss(self, scores, expert_ids):
        """V3's complementary sequence-wise balance loss: alpha * sum_i f_i P_i per sequence."""
        E, k = scores.shape[-1], expert_ids.shape[-1]
        T = scores.shape[1]
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        p = probs.mean(dim=1)  # (B, E)
        counts = torch.zeros_like(p).scatter_add_(1, expert_ids.reshape(scores.shape[0], -1),
                                                  torch.ones_like(expert_ids.reshape(scores.shape[0], -1), dtype=p.dtype))
        f = counts * E / (k * T)
        return self.config.aux_loss_alpha * (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """b_i += gamma * sign(mean load - load_i): overloaded experts become less likely."""
        load = self.expert_load
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if self.gate.use_bias:  # no load (no tokens since the last update): every sign is 0, nothing moves
            self.gate.e_score_correction_bias.add_(torch.sign(load.mean() - load), alpha=gamma)
        load.zero_()
