"""r1kit's AdamW: fused where the device has the kernel, and the same steps and checkpoints as the
unfused one."""
from __future__ import annotations

import io

import pytest

import torch

from r1kit.train.optim import adamw


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((16, 8), (8,), (3, 4, 5))]


def _step(opt, params, seed: int):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def test_fused_on_cpu_and_the_same_steps_as_foreach():
    fused_p, plain_p = _params(0), _params(0)
    fused = adamw([{"params": fused_p[:1], "weight_decay": 0.1}, {"params": fused_p[1:], "weight_decay": 0.0}], lr=1e-2)
    plain = torch.optim.AdamW([{"params": plain_p[:1], "weight_decay": 0.1}, {"params": plain_p[1:], "weight_decay": 0.0}],
                              lr=1e-2, foreach=True)
    assert fused.defaults["fused"] and all(g["fused"] for g in fused.param_groups)
    for i in range(5):
        _step(fused, fused_p, i)
        _step(plain, plain_p, i)
    for a, b in zip(fused_p, plain_p):
        assert (a - b).abs().max().item() < 1e-6


def test_checkpoints_move_between_fused_and_foreach():
    """A run resumed under the other kernel continues exactly (state keys and step counts agree)."""
    a_p, b_p = _params(1), _params(1)
    a = torch.optim.AdamW(a_p, lr=1e-2, foreach=True)
    for i in range(3):
        _step(a, a_p, i)
    b = adamw(b_p, lr=1e-2)
    with torch.no_grad():
        for p, q in zip(b_p, a_p):
            p.copy_(q)
    buffer = io.BytesIO()  # through bytes, as a checkpoint goes (state_dict() shares a's tensors)
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    for i in range(3, 6):
        _step(a, a_p, i)
        _step(b, b_p, i)
    for p, q in zip(a_p, b_p):
        assert (p - q).abs().max().item() < 1e-6


def test_gpu_fused_kernel_only_for_dense_parameters(monkeypatch):
    """The GPU's fused kernel needs each gradient to have its parameter's strides, which autograd
    gives only to dense parameters; a column view (as model/fuse.py makes on a CPU) gets foreach."""
    from r1kit.train import optim

    w = torch.randn(6, 4)
    assert optim._dense(w) and optim._dense(w.t()) and optim._dense(w.t().contiguous().t())
    assert not optim._dense(w[:, :2]) and not optim._dense(torch.randn(8)[::2])

    class FakeDevice:  # a tensor stand-in that reports a CUDA device
        def __init__(self, t):
            self.t, self.device = t, torch.device("cuda")

        def __getattr__(self, name):
            return getattr(self.t, name)

    monkeypatch.setattr(optim, "_get_fused_kernels_supported_devices", lambda: ["cpu", "cuda"])
    assert optim._fusable([FakeDevice(w), FakeDevice(w.t())])
    assert not optim._fusable([FakeDevice(w), FakeDevice(w[:, :2])])
    assert optim._fusable([w, w[:, :2]])  # the CPU kernel takes any strides


def test_bf16_parameters_step_through_float32_master_weights():
    """bf16 weights at lr 1e-6: the master copy follows float32 AdamW exactly (same gradients), the
    weights are its rounding, and a checkpoint restores masters and moments in float32. Plain AdamW
    on the bf16 weights leaves almost all of them where they were."""
    from r1kit.train.optim import MasterWeightAdamW

    def grads(step, params):
        g = torch.Generator().manual_seed(100 + step)
        return [torch.randn(p.shape, generator=g).bfloat16() for p in params]  # what bf16 backward gives

    start = [p.detach().mul(0.02) for p in _params(0)]
    low = [torch.nn.Parameter(t.bfloat16()) for t in start]
    ref = [torch.nn.Parameter(t.bfloat16().float()) for t in start]  # the same starting values, in float32
    plain = [torch.nn.Parameter(t.bfloat16()) for t in start]
    opt = adamw(low, lr=1e-6, betas=(0.9, 0.99), weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-6, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    plain_opt = torch.optim.AdamW(plain, lr=1e-6, betas=(0.9, 0.99), weight_decay=0.1)
    assert isinstance(opt, MasterWeightAdamW)

    def step(i, optimizer, params, cast):
        for p, g in zip(params, grads(i, params)):
            p.grad = cast(g)
        optimizer.step()

    for i in range(3):
        step(i, opt, low, lambda g: g)
        step(i, ref_opt, ref, lambda g: g.float())
        step(i, plain_opt, plain, lambda g: g)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in low]
    resumed_opt = adamw(resumed, lr=1e-6, betas=(0.9, 0.99), weight_decay=0.1)
    buffer.seek(0)
    resumed_opt.load_state_dict(torch.load(buffer))
    for p in resumed:
        assert {k: v.dtype for k, v in resumed_opt.state[p].items() if k != "step"} == \
            {"master": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}
    for i in range(3, 6):
        step(i, opt, low, lambda g: g)
        step(i, resumed_opt, resumed, lambda g: g)
        step(i, ref_opt, ref, lambda g: g.float())
        step(i, plain_opt, plain, lambda g: g)
    for p, r, q, s in zip(low, ref, resumed, start):
        assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["master"], r.detach())  # float32 AdamW, step for step
        assert torch.equal(p.detach(), r.detach().bfloat16())
        assert torch.equal(q.detach(), p.detach()) and torch.equal(resumed_opt.state[q]["master"], r.detach())
        # every weight's master moved by ~6e-6, which accumulates until the bf16 weight rounds to a new value
        assert (opt.state[p]["master"] != s.bfloat16().float()).float().mean() > 0.99
    moved = sum(int((p.detach() != s.bfloat16()).sum()) for p, s in zip(plain, start))
    assert moved < 0.1 * sum(s.numel() for s in start)  # plain AdamW in bf16: each update lost to rounding


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_clip_grad_norm_equals_torch(scale):
    """optim.clip_grad_norm: torch's total norm and clipped gradients, bit for bit, whether or not the
    norm exceeds max_norm (within it the gradients are left alone instead of multiplied by 1.0)."""
    from r1kit.train.optim import clip_grad_norm

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 7)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * scale
        q.grad = p.grad.clone()
    n1 = clip_grad_norm(a, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert torch.equal(n1, n2)
    for p, q in zip(a, b):
        assert torch.equal(p.grad, q.grad)
