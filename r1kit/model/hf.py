"""Hugging Face folders in and out: config.json, model.safetensors (sharded when large), tokenizer.

r1kit's module names are the checkpoints' names, with two exceptions handled here:
- routed experts are stacked in r1kit (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj`
  (E, H, I)) and stored one by one on disk (`mlp.experts.{e}.gate_proj.weight`, ...), as DeepSeek
  and transformers store them;
- multi-token prediction layers are `mtp.{k}.*` in r1kit and `model.layers.{L+k}.*` on disk
  (DeepSeek-V3's layer 61), where each also carries copies of the shared embedding and head.
A load either fills every tensor of the model with the right shape or fails naming the tensor and
the file; a save writes to a temporary folder and renames it into place.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r1kit.checkpoint import atomic_dir, atomic_write_text
from r1kit.model.config import PRESETS, ModelConfig
from r1kit.model.layers import Rotary
from r1kit.model.moe import MoE
from r1kit.model.transformer import Transformer

SAFE_INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


# ---------------------------------------------------------------------------- reading tensors


def _tensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file, from the shard index or the single model.safetensors."""
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: malformed shard index ({err}); expected {{'weight_map': {{name: file}}}}") from None
        return {name: folder / fname for name, fname in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no weights in {folder}: expected model.safetensors or {SAFE_INDEX} with its shards "
            "(PyTorch .bin files are not read; convert them with transformers' save_pretrained)"
        )
    out = {}
    for f in files:
        for name in _open(f).keys():
            out[name] = f
    return out




def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"weight shard {path} is missing (named in {SAFE_INDEX})")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, Exception) as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({err}); re-download or re-save it") from None


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    files = _tensor_files(folder)
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    state = {}
    for f, names in by_file.items():
        handle = _open(f)
        for name in names:
            try:
                state[name] = handle.get_tensor(name)
            except Exception as err:
                raise ValueError(f"{f}: cannot read tensor {name!r} ({err}); the file is corrupt") from None
    return state


# ---------------------------------------------------------------------------- name mapping


def hf_to_r1kit(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    L = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if m and config.is_mla and L <= int(m.group(1)) < L + config.num_nextn_predict_layers:  # MTP
            k, rest = int(m.group(1)) - L, m.group(2)
            if rest in _MTP_COPIES:
                continue  # copies of the shared embedding / head
            name = f"mtp.{k}.{rest}"
        e = _EXPERT.match(name)
        if e:
            experts.setdefault(e.group(1), {}).setdefault(int(e.group(2)), {})[e.group(3)] = t
            continue
        out[name] = t
    for prefix, per_expert in experts.items():
        n = config.n_routed_experts or 0
        missing = [i for i in range(n) if i not in per_expert or len(per_expert[i]) != 3]
        if missing:
            raise ValueError(f"checkpoint is missing weights of experts {missing[:8]} in {prefix}")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((per_expert[i]["gate_proj"], per_expert[i]["up_proj"]), dim=0) for i in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([per_expert[i]["down_proj"] for i in range(n)])
    return out


def r1kit_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    L = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        f = _FUSED.match(name)
        if f:
            prefix, kind = f.groups()
            for i in range(t.shape[0]):
                if kind == "gate_up_proj":
                    gate, up = t[i].chunk(2, dim=0)
                    out[f"{prefix}.{i}.gate_proj.weight"] = gate
                    out[f"{prefix}.{i}.up_proj.weight"] = up
                else:
                    out[f"{prefix}.{i}.down_proj.weight"] = t[i]
            continue
        out[name] = t
    renamed = {}
    for name, t in out.items():
        if name.startswith("mtp."):
            k, rest = name[4:].split(".", 1)
            name = f"model.layers.{L + int(k)}.{rest}"
        renamed[name] = t
    # DeepSeek's MTP layers carry their own copies of the shared embedding and output head
    for k in range(config.num_nextn_predict_layers):
        renamed[f"model.layers.{L + k}.embed_tokens.weight"] = state["model.embed_tokens.weight"]
        head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
        renamed[f"model.layers.{L + k}.shared_head.head.weight"] = head
    return renamed


# ---------------------------------------------------------------------------- load


def _materialize_buffers(model: Transformer, device) -> None:
    """Non-persistent buffers are not in checkpoints; rebuild them after a meta-device load."""
    for module in model.modules():
        if isinstance(module, Rotary):
            fresh = Rotary(model.config, module.inv_freq.shape[0] * 2, module.interleave)
            module.inv_freq = fresh.inv_freq.to(device)
        if isinstance(module, MoE) and module.expert_load.is_meta:
            module.expert_load = torch.zeros(module.expert_load.shape, device=device)


def load_model(folder: str | Path, dtype=None, device=None) -> Transformer:
    folder = Path(folder)
    config = ModelConfig.from_file(folder)
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    raw = read_state(folder)
    L = config.num_hidden_layers
    if config.num_nextn_predict_layers and not any(
            (m := _LAYER.match(k)) and int(m.group(1)) >= L for k in raw):
        # transformers and many conversions drop the MTP layer: run without it, as they do
        config.num_nextn_predict_layers = 0
    state = hf_to_r1kit(raw, config)
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    where = folder / (SAFE_INDEX if (folder / SAFE_INDEX).is_file() else "model.safetensors")
    missing = [k for k in expected if k not in state]
    if config.tie_word_embeddings and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                         f"for a {config.model_type} model as config.json describes it")
    if unexpected:
        raise ValueError(f"{where}: unexpected tensors {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}; "
                         "the weights do not match config.json")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, config.json implies "
                             f"{tuple(v.shape)}")
    state = {k: state[k].to(device=device, dtype=dtype if state[k].is_floating_point() else state[k].dtype)
             for k in expected}
    model.load_state_dict(state, assign=True, strict=True)
    _materialize_buffers(model, device)
    return model.eval()


def load(path, dtype=None, device=None):
    """(model, tokenizer) from a Hugging Face folder; a preset name gives a fresh random model."""
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    folder = Path(path)
    if not folder.exists():
        if str(path) in PRESETS:
            model = Transformer(ModelConfig.preset(str(path))).to(device=device or "cpu", dtype=dtype or torch.float32)
            return model, None
        raise FileNotFoundError(f"{path}: no such model folder (or preset: {', '.join(PRESETS)})")
    if not folder.is_dir():
        raise ValueError(f"{path} is a file; pass the model folder that holds config.json")
    model = load_model(folder, dtype=dtype, device=device)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from r1kit.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(folder)
    return model, tokenizer


# ---------------------------------------------------------------------------- save


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current:
        shards.append(current)
    return shards


def save(model: Transformer, tokenizer, path, max_shard_bytes: int = 5 * 2**30, dtype=None) -> Path:
    """Write an HF folder atomically: config.json, safetensors (+ index), generation config, tokenizer."""
    path = Path(path)
    config = model.config
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = r1kit_to_hf(state, config)
    # safetensors refuses shared storage: give every tensor its own contiguous copy
    state = {k: v.contiguous().clone() for k, v in state.items()}
    hf = config.to_hf()
    some = next(iter(state.values()))
    hf["torch_dtype"] = str(some.dtype).replace("torch.", "")
    with atomic_dir(path) as tmp:
        shards = _shards(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            atomic_write_text(tmp / SAFE_INDEX, json.dumps({"metadata": {"total_size": total},
                                                              "weight_map": weight_map}, indent=2))
        atomic_write_text(tmp / "config.json", json.dumps(hf, indent=2, sort_keys=True))
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path
