"""Int8 weight-only quantization: accuracy per layer, memory saved, held-out loss, generation."""
from __future__ import annotations

import copy

import pytest
import torch

from r1kit.engine import Engine, SamplingParams
from r1kit.model import ModelConfig, Transformer
from r1kit.quantize import Int8Linear, heldout_loss, quantize_int8, quantize_per_channel


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_linear(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True).to(dtype)
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (96,)
    x = torch.randn(3, 5, 256, dtype=dtype)
    ref = linear(x).float()
    err = (q(x).float() - ref).norm() / ref.norm()
    assert err < 0.01
    # the dequantized weight is within half a step of the original, per row
    w = linear.weight.float()
    assert ((q.dequantize().float() - w).abs() <= q.scales.float()[:, None] * 0.5 + 1e-2 * w.abs().amax()).all()
    qw, scales = quantize_per_channel(w)
    assert qw.abs().max() <= 127 and torch.allclose(scales, w.abs().amax(1) / 127)


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_quantized_model_saves_memory_keeps_loss_and_generates(preset):
    torch.manual_seed(1)
    model = Transformer(ModelConfig.preset(preset)).eval()
    heldout = torch.randint(0, model.config.vocab_size, (6, 48))
    quantized = copy.deepcopy(model)
    report = quantize_int8(quantized)
    assert report.bytes_after < report.bytes_before
    assert report.saved_fraction > (0.2 if preset == "tiny" else 0.5)  # MoE experts stay full precision
    if model.config.is_mla:
        assert all(name.endswith("kv_b_proj") for name in report.skipped) and report.skipped
    assert isinstance(quantized.lm_head if quantized.lm_head is not None else Int8Linear(1, 1), Int8Linear)
    before, after = heldout_loss(model, heldout), heldout_loss(quantized, heldout)
    assert abs(after - before) < 0.01 * before
    with torch.no_grad():
        drift = (quantized(heldout) - model(heldout)).norm() / model(heldout).norm()
    assert drift < 0.05
    # the engine runs the quantized model exactly as it runs any model
    prompt = [3, 1, 4, 1, 5]
    out = Engine(quantized).generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    with torch.no_grad():
        logits = quantized(torch.tensor([prompt + out.token_ids]))[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out.token_ids
    assert "int8" in str(report) and "saved" in str(report)
