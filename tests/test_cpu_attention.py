"""cpu_attention.causal_attention: training's causal attention in C, against SDPA on the same inputs."""
import pytest
import torch
import torch.nn.functional as F

from r1kit.model import ModelConfig, Transformer, attention, cpu_attention, cpu_kernels

needs_kernels = pytest.mark.skipif(cpu_kernels.library() is None,
                                   reason="the CPU kernels need an x86 CPU with AVX2 and a C compiler")


def _reference(q, k, v, scale, q2=None, k2=None):
    """SDPA on the concatenated parts, key/value heads expanded to every query head."""
    H = q.shape[2]
    if q2 is not None:
        q, k = torch.cat((q, q2), -1), torch.cat((k, k2.expand(-1, -1, k.shape[2], -1)), -1)
    k = k.repeat_interleave(H // k.shape[2], 2)
    v = v.repeat_interleave(H // v.shape[2], 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale)
    return out.transpose(1, 2)


SHAPES = {  # B, T, H, G, d1, dv, d2 (rope part; 0: none), a shared rope key
    "gqa": (2, 37, 4, 2, 64, 64, 0, False),
    "mha_long_head": (1, 70, 2, 2, 128, 128, 0, False),
    "mqa_odd_dims": (3, 21, 4, 1, 20, 12, 0, False),
    "mla": (3, 50, 4, 4, 32, 32, 16, True),
    "mla_wide_v": (2, 19, 2, 2, 24, 40, 8, True),
    "two_parts_per_head": (2, 9, 4, 2, 8, 8, 8, False),
}


@needs_kernels
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("keep_p", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_causal_attention_equals_sdpa(shape, keep_p, threads, monkeypatch):
    """Forward and every gradient, with backward reading forward's P or recomputing it, on strided
    parts (slices of a wider tensor, as MLA's q_nope | q_rope)."""
    B, T, H, G, d1, dv, d2, shared = SHAPES[shape]
    if not keep_p:
        monkeypatch.setattr(cpu_attention, "SAVE_P_BYTES", 0)
    else:
        monkeypatch.setattr(cpu_attention, "SAVE_P_BYTES", 1 << 30)
    torch.manual_seed(0)
    q_all = torch.randn(B, T, H, d1 + d2 + 3)  # a wider tensor: the parts are strided views of it
    kv = torch.randn(B, T, G, d1 + dv)
    leaves = [q_all.requires_grad_(), kv.requires_grad_()]
    q, k, v = q_all[..., :d1], kv[..., :d1], kv[..., d1:]
    q2 = k2 = None
    if d2:
        q2 = q_all[..., d1:d1 + d2]
        k2 = torch.randn(B, T, 1 if shared else G, d2, requires_grad=True)
        leaves.append(k2)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_attention.causal_attention(q, k, v, 0.3, q2=q2, k2=k2)
        assert out is not None and out.shape == (B, T, H, dv) and out.is_contiguous()
        dy = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dy)
    finally:
        torch.set_num_threads(old)
    ref = _reference(q, k, v, 0.3, q2, k2)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_causal_attention_without_grad_and_where_it_does_not_apply():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 10, 4, 16), torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)
    with torch.no_grad():
        out = cpu_attention.causal_attention(q, k, v, 0.25)
    torch.testing.assert_close(out, _reference(q, k, v, 0.25), rtol=1e-5, atol=1e-5)
    assert cpu_attention.causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25) is None  # dtype
    assert cpu_attention.causal_attention(q[:, :1], k[:, :1], v[:, :1], 0.25) is None  # one token: SDPA
    assert cpu_attention.causal_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v, 0.25) is None  # 4 heads on 3
    long = torch.randn(1, cpu_attention.MAX_LEN + 1, 1, 8)
    assert cpu_attention.causal_attention(long, long, long, 1.0) is None


@needs_kernels
@pytest.mark.parametrize("model_type", ["qwen2", "qwen2_fused", "deepseek_v3", "deepseek_v3_fused"])
def test_training_step_is_the_same_with_the_kernel(model_type, monkeypatch):
    """A model's loss and gradients with attention in C equal those with SDPA (attention.py's causal
    training path: GQA, and MLA with its two parts and the shared rope key), also with the engine's
    fused q|k|v weights (GRPO trains the model its engine decodes with)."""
    from r1kit.model.fuse import prepare_for_decode

    torch.manual_seed(0)
    if model_type.startswith("deepseek_v3"):
        cfg = ModelConfig.preset("tiny", vocab_size=200)
    else:
        cfg = ModelConfig(model_type="qwen2", vocab_size=200, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = Transformer(cfg).train()
    if model_type.endswith("_fused"):
        prepare_for_decode(model)
    ids = torch.randint(0, 200, (3, 40))
    calls = []
    real = cpu_attention.causal_attention

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(attention, "causal_attention", spy)
    loss = model.loss(ids)["loss"]
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert calls and all(calls)
    monkeypatch.setattr(attention, "causal_attention", lambda *a, **kw: None)  # SDPA
    ref = model.loss(ids)["loss"]
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="checks the AVX2 build on an AVX-512 CPU")
def test_the_avx2_build_agrees_too(tmp_path):
    """The AVX2 build's panels are 24 columns and its tiles 4 rows: other edges, same results."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, R1KIT_CPU_ISA="avx2", R1KIT_CACHE=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "equals_sdpa and 1 and (gqa or mla or odd)"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]  # (5 when nothing ran)
    assert [f.name for f in tmp_path.iterdir() if f.suffix == ".so"][0].endswith("-avx2.so")


@needs_kernels
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("mla", [True, False])
def test_rotation_inside_equals_rotary_outside(interleave, mla):
    """rope=(cos, sin, interleave): the kernel rotates the last R numbers of each query and key head
    itself (and its gradients back); the same as layers.Rotary.apply first, then attention. MLA's form:
    q whole, k = nope | shared rope key, k and v the halves of one tensor (kv) whose gradient is one."""
    from r1kit.model.layers import Rotary

    torch.manual_seed(0)
    B, T, H = 2, 29, 4
    rot = Rotary(ModelConfig.preset("tiny"), 16, interleave)
    cos, sin = rot.cos_sin(torch.arange(T).unsqueeze(0).expand(B, T), torch.float32)
    if mla:
        q = torch.randn(B, T, H, 48, requires_grad=True)
        kv = torch.randn(B, T, H, 64, requires_grad=True)
        k_rope = torch.randn(B, T, 1, 16, requires_grad=True)
        leaves = [q, kv, k_rope]
        out = cpu_attention.causal_attention(q, kv[..., :32], kv[..., 32:], 0.2, k2=k_rope, rope=(cos, sin, interleave),
                                             kv=kv)
        q_ref = torch.cat((q[..., :32], rot.apply(q[..., 32:], cos, sin)), -1)
        ref = _reference(q_ref[..., :32], kv[..., :32], kv[..., 32:], 0.2, q2=q_ref[..., 32:],
                         k2=rot.apply(k_rope, cos, sin))
    else:
        q = torch.randn(B, T, H, 16, requires_grad=True)
        k = torch.randn(B, T, 2, 16, requires_grad=True)
        v = torch.randn(B, T, 2, 24, requires_grad=True)
        leaves = [q, k, v]
        out = cpu_attention.causal_attention(q, k, v, 0.2, rope=(cos, sin, interleave))
        ref = _reference(rot.apply(q, cos, sin), rot.apply(k, cos, sin), v, 0.2)
    assert out is not None
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
