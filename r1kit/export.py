"""Export a Hugging Face checkpoint folder to GGUF, the file llama.cpp, ollama and LM Studio run.

`r1kit export gguf PATH [--out FILE] [--dtype f32|f16]` covers the dense R1-Distill students
(model_type "qwen2" and "llama"). It reads config.json, the safetensors shards and tokenizer.json
directly, so any HF folder of those families works (r1kit's own or a downloaded one), and writes
the tensors one at a time: memory stays at one tensor, whatever the model size.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np

SUPPORTED = ("qwen2", "llama")

# HF name (inside a layer) -> GGUF name, as llama.cpp's loader expects them
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # recomputed by every runtime

# tokenizer.json pre-tokenizer regex -> llama.cpp's name for it (`tokenizer.ggml.pre`)
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


# --- reading the HF folder ----------------------------------------------------------------------
def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; expected a Hugging Face checkpoint folder "
                                "(config.json, model*.safetensors, tokenizer.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported by GGUF export; "
                         f"supported: {', '.join(SUPPORTED)} (the dense R1-Distill families)")
    return config


def tensor_files(folder: Path) -> dict[str, Path]:
    """Every tensor name -> the safetensors file holding it (one file or an indexed set of shards)."""
    from safetensors import safe_open

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no model*.safetensors files (only safetensors checkpoints can be exported)")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                where[name] = file
    return where


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_parameters(config: dict) -> dict:
    # transformers 5 writes `rope_parameters` (with rope_theta inside); older configs `rope_scaling`
    return dict(config.get("rope_parameters") or config.get("rope_scaling") or {})


def permute_for_llama_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half RoPE layout to llama.cpp's interleaved-pair layout.

    HF Llama pairs dimension i with i + head_dim/2 inside each head; llama.cpp's "llama"
    architecture rotates adjacent pairs (2i, 2i+1). Qwen2 runs with rotate-half in llama.cpp too
    (NEOX rope), so its weights go through unchanged.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def gguf_tensor_plan(config: dict, hf_names: list[str]) -> list[tuple[str, str]]:
    """[(hf_name, gguf_name)] in file order; refuses tensors it does not know how to place."""
    tied = bool(config.get("tie_word_embeddings", False))
    plan = []
    for name in hf_names:
        if IGNORED.match(name):
            continue
        if name in GLOBAL_TENSORS:
            if name == "lm_head.weight" and tied:
                continue  # llama.cpp reuses token_embd when there is no output tensor
            plan.append((name, GLOBAL_TENSORS[name]))
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match is None or match.group(2) not in LAYER_TENSORS:
            raise ValueError(f"tensor {name!r} has no GGUF counterpart for model_type "
                             f"{config['model_type']!r}; is this a dense {'/'.join(SUPPORTED)} checkpoint?")
        plan.append((name, f"blk.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}"))
    if not tied and "lm_head.weight" not in hf_names:
        raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
    order = lambda item: (item[1].startswith("blk."), _layer_index(item[1]), item[1])
    return sorted(plan, key=order)


def _layer_index(gguf_name: str) -> int:
    return int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Llama 3.1's frequency-dependent RoPE scaling as llama.cpp's `rope_freqs` tensor (R1-Distill-Llama)."""
    rope = _rope_parameters(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    base = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    dim = _head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# --- the tokenizer ------------------------------------------------------------------------------
def _pre_tokenizer_name(tokenizer_json: dict, path: Path) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split" and isinstance(p.get("pattern"), dict)]
    if len(regexes) == 1 and regexes[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[regexes[0]]
    if not regexes and any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt-2"
    raise ValueError(f"{path}: pre-tokenizer not recognised for llama.cpp; pass --tokenizer-pre NAME "
                     "(llama.cpp's name for it, e.g. qwen2, llama-bpe, deepseek-v3)")


def _looks_like_control(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def gguf_vocabulary(folder: Path, vocab_size: int, tokenizer_pre: str | None = None) -> dict:
    """tokens, token types, merges and the pre-tokenizer name of a byte-level BPE tokenizer.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (GGUF export embeds the tokenizer)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export supports byte-level BPE only")
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {i: TOKEN_NORMAL for i in by_id}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        control = added.get("special", False) or _looks_like_control(added["content"])
        types[added["id"]] = TOKEN_CONTROL if control else TOKEN_USER_DEFINED
    if max(by_id) >= vocab_size:
        raise ValueError(f"{path}: token id {max(by_id)} does not fit the model's vocab_size {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]  # embedding rows with no token
    token_types = [types.get(i, TOKEN_UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        # A vocabulary without merges (r1kit's "char" tokenizers) is valid, but llama.cpp refuses a
        # gpt2 vocabulary with no merges list and gguf refuses empty arrays. One merge of two added
        # tokens is a no-op: added tokens are matched whole, never inside a BPE word.
        added = [by_id[i] for i in sorted(by_id) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and " " not in by_id[i]]
        if len(added) < 2:
            raise ValueError(f"{path}: a BPE vocabulary with no merges needs two added tokens for llama.cpp")
        merges = [f"{added[0]} {added[1]}"]
    pre = tokenizer_pre or _pre_tokenizer_name(data, path)
    return {"tokens": tokens, "token_types": token_types, "merges": merges, "pre": pre}


# --- writing --------------------------------------------------------------------------------------
def export_gguf(path: str | os.PathLike, out: str | os.PathLike | None = None, dtype: str = "f16",
                tokenizer_pre: str | None = None) -> Path:
    """Write `path` (an HF folder) as one GGUF file; returns the file's path."""
    import gguf
    import torch
    from safetensors import safe_open

    from r1kit.tokenizer import Tokenizer

    if dtype not in ("f32", "f16"):
        raise ValueError(f"--dtype {dtype!r}: choose f32 or f16")
    folder = Path(path)
    config = read_config(folder)
    arch = config["model_type"]
    out = Path(out) if out is not None else folder.parent / f"{folder.name}-{dtype}.gguf"
    where = tensor_files(folder)
    plan = gguf_tensor_plan(config, list(where))
    tokenizer = Tokenizer.from_folder(folder)
    vocab = gguf_vocabulary(folder, config["vocab_size"], tokenizer_pre)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(folder.resolve().name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        _add_hyperparameters(writer, config)
        _add_tokenizer(writer, tokenizer, vocab)

        n_heads, n_kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
        rope_factors = llama3_rope_factors(config) if arch == "llama" else None

        def load(hf_name: str) -> np.ndarray:
            with safe_open(where[hf_name], framework="pt") as f:
                array = f.get_tensor(hf_name).to(torch.float32).numpy()
            if arch == "llama" and ".self_attn.q_proj." in hf_name:
                array = permute_for_llama_rope(array, n_heads)
            elif arch == "llama" and ".self_attn.k_proj." in hf_name:
                array = permute_for_llama_rope(array, n_kv_heads)
            # norms, biases (1-D) stay float32, as llama.cpp's converter keeps them
            return array.astype(np.float16 if dtype == "f16" and array.ndim > 1 else np.float32)

        # header and tensor table first (shapes only), then the data one tensor at a time
        items = ([("rope_freqs.weight", None)] if rope_factors is not None else []) + [(g, h) for h, g in plan]
        for gguf_name, hf_name in items:
            if hf_name is None:
                shape, itemsize = rope_factors.shape, 4
            else:
                with safe_open(where[hf_name], framework="pt") as f:
                    shape = tuple(f.get_slice(hf_name).get_shape())
                itemsize = 2 if dtype == "f16" and len(shape) > 1 else 4
            np_dtype = np.float16 if itemsize == 2 else np.float32
            writer.add_tensor_info(gguf_name, shape, np.dtype(np_dtype), int(np.prod(shape)) * itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, hf_name in items:
            writer.write_tensor_data(rope_factors if hf_name is None else load(hf_name))
        writer.fout[0].flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, out)  # the file appears complete or not at all
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def _add_hyperparameters(writer, config: dict) -> None:
    rope = _rope_parameters(config)
    n_heads = config["num_attention_heads"]
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_heads))
    writer.add_rope_freq_base(float(config.get("rope_theta", rope.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(_head_dim(config))
    if config.get("head_dim") and config["head_dim"] != config["hidden_size"] // n_heads:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", "llama3", None):
        raise ValueError(f"config.json: rope scaling {rope_type!r} is not supported by GGUF export "
                         "(supported: none, linear, llama3)")


def _add_tokenizer(writer, tokenizer, vocab: dict) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_types"])
    writer.add_token_merges(vocab["merges"])
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(tokenizer.add_bos_token))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=["gguf"], help="output format")
    parser.add_argument("path", help="Hugging Face checkpoint folder (config.json, model*.safetensors, tokenizer.json)")
    parser.add_argument("--out", default=None, help="output file (default: <PATH>-<dtype>.gguf beside the folder)")
    parser.add_argument("--dtype", choices=["f32", "f16"], default="f16",
                        help="storage type of the weight matrices (norms and biases stay f32)")
    parser.add_argument("--tokenizer-pre", default=None,
                        help="llama.cpp pre-tokenizer name, when it cannot be recognised from tokenizer.json")


def main(args: argparse.Namespace) -> int:
    out = export_gguf(args.path, out=args.out, dtype=args.dtype, tokenizer_pre=args.tokenizer_pre)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0
