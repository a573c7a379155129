"""r1kit's AdamW: fused where the device has the kernel, and the same steps and checkpoints as the
unfused one."""
from __future__ import annotations

import io

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
