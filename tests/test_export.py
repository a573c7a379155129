"""GGUF export: every tensor, the hyperparameters and the tokenizer, read back with gguf's reader."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from r1kit.export import export_gguf, llama3_rope_factors, permute_for_llama_rope
from r1kit.tokenizer import BOS_TOKEN, EOS_TOKEN, R1_CHAT_TEMPLATE, THINK_CLOSE, USER_TOKEN, train_tokenizer


CORPUS = [f"Question {i}: what is {i * 7} + {i * 3}? The answer is {i * 10}.\n" for i in range(300)]
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=380, kind="bpe")


def _hf_folder(tmp_path, tokenizer, family: str, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=tokenizer.vocab_size + 6,  # padded rows, as Qwen's 151936
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
    kwargs.update(extra)
    model = model_class(config_class(**kwargs))
    with torch.no_grad():  # make norms and biases non-trivial so a swap would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p))
    folder = tmp_path / f"tiny-{family}"
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def _expected_name(hf_name: str) -> str:
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in glob:
        return glob[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_qwen2_export_tensors_and_metadata(tmp_path, tokenizer, dtype):
    folder = _hf_folder(tmp_path, tokenizer, "qwen2")
    out = export_gguf(folder, out=tmp_path / "out" / "model.gguf", dtype=dtype)
    assert out.is_file() and not list(out.parent.glob(".*.tmp"))
    reader = gguf.GGUFReader(out)
    state = load_file(folder / "model.safetensors")
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {_expected_name(n) for n in state}  # every tensor, nothing else
    assert len(tensors) == 3 + 2 * 12  # qwen2 has q/k/v biases
    for hf_name, value in state.items():
        t = tensors[_expected_name(hf_name)]
        expected = value.float().numpy()
        assert t.data.shape == expected.shape, hf_name
        assert list(t.shape) == list(reversed(expected.shape))  # GGUF stores dims innermost first
        if expected.ndim == 1 or dtype == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(t.data, expected)  # qwen2: no rope permutation
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(t.data, expected.astype(np.float16))

    f = _fields(reader)
    config = json.loads((folder / "config.json").read_text())
    assert f["general.architecture"] == "qwen2"
    assert f["general.file_type"] == (0 if dtype == "f32" else 1)
    assert f["qwen2.context_length"] == 512
    assert f["qwen2.embedding_length"] == 64
    assert f["qwen2.block_count"] == 2
    assert f["qwen2.feed_forward_length"] == 128
    assert f["qwen2.attention.head_count"] == 4
    assert f["qwen2.attention.head_count_kv"] == 2
    assert f["qwen2.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert f["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)

    # tokenizer: byte-level BPE vocabulary in id order, padded to the embedding rows
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = f["tokenizer.ggml.tokens"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert len(tokens) == config["vocab_size"] == tokenizer.vocab_size + 6
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-1] == f"[PAD{config['vocab_size'] - 1}]"
    types = f["tokenizer.ggml.token_type"]
    assert types[tokenizer.token_to_id(BOS_TOKEN)] == 3 and types[tokenizer.token_to_id(USER_TOKEN)] == 3  # control
    assert types[tokenizer.token_to_id(THINK_CLOSE)] == 4  # user-defined: kept in decoded text
    assert types[tokenizer.encode("Q")[0]] == 1 and types[-1] == 5
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert len(merges) == tokenizer.vocab_size - 256 - 6 > 10  # every learned token came from a merge
    assert f["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.token_to_id(EOS_TOKEN)
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.chat_template"] == R1_CHAT_TEMPLATE


def _rope_rotate_half(x, positions, base):  # HF: dim i pairs with i + d/2
    d = x.shape[-1]
    theta = positions[:, None] * base ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(theta), np.sin(theta)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _rope_interleaved(x, positions, base):  # llama.cpp "llama": dim 2i pairs with 2i + 1
    d = x.shape[-1]
    theta = positions[:, None] * base ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(theta), np.sin(theta)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def test_llama_export_permutes_q_k_for_interleaved_rope(tmp_path, tokenizer):
    folder = _hf_folder(tmp_path, tokenizer, "llama", rope_theta=10000.0)
    out = export_gguf(folder, dtype="f32")
    assert out == tmp_path / "tiny-llama-f32.gguf"
    reader = gguf.GGUFReader(out)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    state = {k: v.numpy() for k, v in load_file(folder / "model.safetensors").items()}
    assert "blk.0.attn_q.bias" not in tensors and len(tensors) == 3 + 2 * 9
    for hf_name, value in state.items():
        name = _expected_name(hf_name)
        if "attn_q" in name or "attn_k" in name:
            assert not np.array_equal(tensors[name], value)  # reordered rows...
            assert np.array_equal(np.sort(tensors[name], axis=0), np.sort(value, axis=0))  # ...same rows
        else:
            np.testing.assert_array_equal(tensors[name], value)
    assert _fields(reader)["llama.rope.dimension_count"] == 16

    # what matters: attention scores after RoPE are the same in both layouts (GQA: 4 q heads, 2 kv)
    rng = np.random.default_rng(0)
    x, positions, head_dim = rng.standard_normal((7, 64)).astype(np.float32), np.arange(7, dtype=np.float64), 16
    for layer in range(2):
        q_hf = (x @ state[f"model.layers.{layer}.self_attn.q_proj.weight"].T).reshape(7, 4, head_dim)
        k_hf = (x @ state[f"model.layers.{layer}.self_attn.k_proj.weight"].T).reshape(7, 2, head_dim)
        q_gg = (x @ tensors[f"blk.{layer}.attn_q.weight"].T).reshape(7, 4, head_dim)
        k_gg = (x @ tensors[f"blk.{layer}.attn_k.weight"].T).reshape(7, 2, head_dim)
        for h in range(4):
            hf = _rope_rotate_half(q_hf[:, h], positions, 1e4) @ _rope_rotate_half(k_hf[:, h // 2], positions, 1e4).T
            gg = _rope_interleaved(q_gg[:, h], positions, 1e4) @ _rope_interleaved(k_gg[:, h // 2], positions, 1e4).T
            np.testing.assert_allclose(gg, hf, rtol=1e-4, atol=1e-5)


def test_permutation_is_a_row_reorder_within_each_head():
    w = np.arange(8 * 3).reshape(8, 3)  # 2 heads of dim 4
    p = permute_for_llama_rope(w, 2)
    assert [r[0] // 3 for r in p] == [0, 2, 1, 3, 4, 6, 5, 7]  # (i, i + d/2) become neighbours


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0, rope_scaling=rope, max_position_embeddings=512)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    config = {"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000.0, "rope_scaling": rope}
    factors = llama3_rope_factors(config)
    base_inv_freq = 500000.0 ** (-np.arange(0, 16, 2) / 16)
    # llama.cpp divides each frequency by its factor
    np.testing.assert_allclose(base_inv_freq / factors, inv_freq.double().numpy(), rtol=1e-5)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < 8.0
    assert llama3_rope_factors({"hidden_size": 64, "num_attention_heads": 4}) is None


def test_llama3_scaled_export_writes_rope_freqs(tmp_path, tokenizer):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    folder = _hf_folder(tmp_path, tokenizer, "llama", rope_theta=500000.0, rope_scaling=rope)
    reader = gguf.GGUFReader(export_gguf(folder, dtype="f16"))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(tensors["rope_freqs.weight"].data, llama3_rope_factors(json.loads((folder / "config.json").read_text())))
    assert _fields(reader)["llama.rope.freq_base"] == pytest.approx(500000.0)


def test_tied_embeddings_have_no_output_tensor(tmp_path, tokenizer):
    folder = _hf_folder(tmp_path, tokenizer, "qwen2", tie_word_embeddings=True)
    names = {t.name for t in gguf.GGUFReader(export_gguf(folder, dtype="f32")).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


def test_cli_and_errors(tmp_path, tokenizer, capsys):
    from r1kit.cli import main as cli

    folder = _hf_folder(tmp_path, tokenizer, "qwen2")
    assert cli(["export", "gguf", str(folder), "--out", str(tmp_path / "cli.gguf"), "--dtype", "f32"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "cli.gguf").is_file()
    assert cli(["export", "gguf", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "deepseek_v3"}))
    with pytest.raises(ValueError, match="deepseek_v3"):
        export_gguf(folder)
    (folder / "config.json").write_text(json.dumps(config))
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    tok_json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    (folder / "tokenizer.json").write_text(json.dumps(tok_json))
    with pytest.raises(ValueError, match="--tokenizer-pre"):
        export_gguf(folder)
    out = export_gguf(folder, out=tmp_path / "forced.gguf", tokenizer_pre="qwen2")
    assert _fields(gguf.GGUFReader(out))["tokenizer.ggml.pre"] == "qwen2"
    # the failed exports left neither a result nor a temporary file behind
    assert not (tmp_path / "tiny-qwen2-f16.gguf").exists() and not list(tmp_path.glob(".*.tmp"))


def test_char_tokenizer_gets_a_no_op_merge_llama_cpp_requires(tmp_path):
    # llama.cpp refuses a gpt2 vocabulary without merges; a merge of two added tokens never applies
    char = train_tokenizer(CORPUS)
    folder = _hf_folder(tmp_path, char, "qwen2")
    f = _fields(gguf.GGUFReader(export_gguf(folder, dtype="f32")))
    assert f["tokenizer.ggml.merges"] == [f"{BOS_TOKEN} {EOS_TOKEN}"]
    assert f["tokenizer.ggml.tokens"][:256] == [char.id_to_token(i) for i in range(256)]
    assert f["tokenizer.ggml.tokens"][ord("7")] == "7"  # ids are byte values
