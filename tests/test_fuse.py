"""prepare_for_decode: fused projections and transposed weights change speed, never results."""
import copy

import pytest
import torch

import r1kit
from r1kit.model import ModelConfig, Transformer
from r1kit.model.fuse import prepare_for_decode

FAMILIES = {
    "qwen2": dict(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama": dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "deepseek_v3": dict(ModelConfig.preset("tiny").to_hf(), num_nextn_predict_layers=1),
}


def _pair(family):
    torch.manual_seed(0)
    plain = Transformer(ModelConfig.from_hf(FAMILIES[family])).eval()
    fused = copy.deepcopy(plain)
    prepare_for_decode(fused)
    return plain, fused


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_decode_equals_plain(family):
    plain, fused = _pair(family)
    assert fused.model.layers[0].self_attn.fused is not None
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert fused.model.layers[0].self_attn.fused.usable()
        a, b = plain(ids), fused(ids)
        cache_a, cache_b = plain.new_cache(2, 12), fused.new_cache(2, 12)
        pos = torch.arange(9).expand(2, 9)
        pa = plain(ids, positions=pos, cache=cache_a)
        pb = fused(ids, positions=pos, cache=cache_b)
    assert (a - b).abs().max().item() < 1e-5
    assert (pa - pb).abs().max().item() < 1e-5
    # same names, shapes and values: a checkpoint cannot tell
    sa, sb = plain.state_dict(), fused.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_training_through_fused_weights(family, monkeypatch):
    """With gradients on, the fused product runs as one op (_FusedLinear) and every layer gets the
    gradient the plain model gives it, contiguous (autograd would otherwise copy a transposed one
    at every backward); an optimizer step on the views updates what the fused decode reads."""
    from r1kit.model import fuse

    plain, fused = _pair(family)
    plain.train()
    fused.train()
    calls = []
    apply = fuse._FusedLinear.apply
    monkeypatch.setattr(fuse._FusedLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, fused)]
    for model, opt in zip((plain, fused), opts):
        model.loss(ids)["loss"].backward()
        opt.step()
    assert len(calls) >= 2 * plain.config.num_hidden_layers  # attention's and the dense MLP's, every layer
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert (p.grad - q.grad).abs().max().item() < 1e-5, name
        assert q.grad.is_contiguous() or q.grad.stride() == q.stride(), name
    plain.eval()
    fused.eval()
    with torch.inference_mode():
        assert fused.model.layers[0].self_attn.fused.usable()
        assert (plain(ids) - fused(ids)).abs().max().item() < 1e-4


def test_fused_falls_back_when_a_weight_is_replaced():
    plain, fused = _pair("qwen2")
    attn = fused.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone() * 2)
        assert not attn.fused.usable()
        plain.model.layers[0].self_attn.k_proj.weight.mul_(2)
        ids = torch.randint(0, 97, (1, 5))
        assert (plain(ids) - fused(ids)).abs().max().item() < 1e-5


def test_saving_a_prepared_model_round_trips(tmp_path):
    plain, fused = _pair("qwen2")
    r1kit.save(fused, None, tmp_path / "m")
    loaded, _ = r1kit.load(tmp_path / "m")
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert (loaded(ids) - plain(ids)).abs().max().item() < 1e-5


def test_quantizing_after_prepare_uses_the_quantized_layers():
    """A layer replaced on its parent (int8) switches the parent back to its layers one by one:
    the fused full-precision matrix must not silently bypass the quantization."""
    from r1kit.quantize import quantize_int8

    plain, fused = _pair("qwen2")
    quantize_int8(plain)
    quantize_int8(fused)
    assert not fused.model.layers[0].self_attn.fused.usable()
    assert not fused.model.layers[0].mlp.fused.usable()
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert (plain(ids) - fused(ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_engine_transposes_weights_only_for_torchs_products(family):
    """An engine that packs its weights (cpu_kernels) leaves the unfused ones in their layout, which
    the training that shares them (GRPO) prefers; MLA's kv_b_proj, read in place by the C decode
    block, is transposed either way. Without packing, transposed storage speeds torch's products."""
    from r1kit.engine import Engine
    from r1kit.model import cpu_kernels

    plain, _ = _pair(family)
    packed, unpacked = copy.deepcopy(plain), copy.deepcopy(plain)
    Engine(packed, max_batch_size=2, max_seq_len=16)
    Engine(unpacked, max_batch_size=2, max_seq_len=16, pack_weights=False)
    attn = packed.model.layers[0].self_attn
    transposed = lambda w: w.stride(0) == 1 and w.shape[0] > 1  # noqa: E731
    if cpu_kernels.library() is not None:
        assert attn.o_proj.weight.is_contiguous() and packed.model.embed_tokens.weight.is_contiguous()
    assert transposed(unpacked.model.layers[0].self_attn.o_proj.weight)
    if family == "deepseek_v3":
        assert transposed(attn.kv_b_proj.weight) and transposed(unpacked.model.layers[0].self_attn.kv_b_proj.weight)
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (packed(ids) - plain(ids)).abs().max().item() < 1e-5
