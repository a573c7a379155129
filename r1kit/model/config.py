"""One configuration for every model family r1kit runs.

Field names are the Hugging Face `config.json` keys (`kv_lora_rank`, `n_routed_experts`, ...), so
`from_hf` / `to_hf` are mostly a copy. Three layouts share one Transformer:
- `qwen2`, `llama`: dense GQA decoders (the R1-Distill students);
- `deepseek_v3` (and `deepseek_v2`): Multi-head Latent Attention + DeepSeekMoE + multi-token
  prediction.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("qwen2", "llama", "deepseek_v3", "deepseek_v2")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # dense families; hidden_size // heads when None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type"/"rope_type": "yarn"|"llama3"|..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    # --- Multi-head Latent Attention (deepseek_v3 / deepseek_v2) ---
    q_lora_rank: int | None = None  # None: direct query projection (V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True  # DeepSeek's weights keep rope dims as interleaved pairs

    # --- DeepSeekMoE ---
    n_routed_experts: int | None = None  # None: dense MLP everywhere
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3: bias-corrected choice) | "greedy" (V2)
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) | "softmax" (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3 uses 1e-4)
    bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free balancing bias

    # --- Multi-token prediction ---
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.3  # lambda

    # keys of the source config.json that r1kit does not use, kept for a faithful round trip
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    def __post_init__(self):
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2 always has q/k/v biases (never on o_proj)
        self.validate()

    @property
    def is_mla(self) -> bool:
        return self.model_type in ("deepseek_v3", "deepseek_v2")

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type") or "default"

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        need(self.model_type in FAMILIES,
             f"unknown model_type {self.model_type!r}; r1kit supports {', '.join(FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            need(int(getattr(self, name)) > 0, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.num_attention_heads % self.kv_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.kv_heads})")
        if self.is_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(int(getattr(self, name) or 0) > 0, f"{self.model_type} needs {name} > 0")
            need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        else:
            need(self.hidden_size % self.num_attention_heads == 0 or self.head_dim is not None,
                 "hidden_size must divide by num_attention_heads (or set head_dim)")
            need(self.attn_head_dim % 2 == 0, "head_dim must be even for rotary embeddings")
        if self.is_moe:
            need(self.num_experts_per_tok > 0, "num_experts_per_tok must be > 0 with n_routed_experts")
            need(self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                 f"({self.n_routed_experts})")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0 with experts")
            need(self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts ({self.n_routed_experts}) must divide into n_group ({self.n_group})")
            need(1 <= self.topk_group <= self.n_group, "topk_group must be in [1, n_group]")
            need(self.scoring_func in ("sigmoid", "softmax"), f"unknown scoring_func {self.scoring_func!r}")
            need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
                 f"unknown topk_method {self.topk_method!r}")
            if self.n_group > 1:
                need(self.n_routed_experts // self.n_group >= 2 or self.topk_method != "noaux_tc",
                     "group-limited routing needs at least 2 experts per group")
        need(self.rope_type in ("default", "yarn", "llama3", "linear"),
             f"unsupported rope_scaling type {self.rope_type!r} (default, linear, llama3, yarn)")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        values = copy.deepcopy(PRESETS[name])
        values.update(overrides)
        return cls(**values)

    # ------------------------------------------------------------------ Hugging Face keys
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config dict. Unknown model types and missing keys fail loudly."""
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported; r1kit loads {', '.join(FAMILIES)}"
            )
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ValueError(f"{source}: required key {key!r} is missing for model_type {model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        # transformers 5 writes rope settings as `rope_parameters`; older files and DeepSeek's own
        # use `rope_theta` + `rope_scaling`.
        rope_params = hf.pop("rope_parameters", None)
        if isinstance(rope_params, dict):
            rp = dict(rope_params)
            if "rope_theta" in rp:
                hf.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default" and not hf.get("rope_scaling"):
                hf["rope_scaling"] = rp
        if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
            hf["num_nextn_predict_layers"] = hf.pop("num_mtp_layers")
        for key, value in hf.items():
            if key in names:
                values[key] = value
            else:
                extra[key] = value
        if model_type in ("qwen2", "llama"):
            values.setdefault("n_routed_experts", None)
        if values.get("rope_scaling") is not None and not isinstance(values["rope_scaling"], dict):
            raise ValueError(f"{source}: rope_scaling must be an object, got {values['rope_scaling']!r}")
        if values.get("rope_scaling") and (values["rope_scaling"].get("rope_type") or
                                           values["rope_scaling"].get("type")) == "default":
            values["rope_scaling"] = None
        try:
            return cls(**values, extra=extra)
        except TypeError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_hf(self) -> dict[str, Any]:
        """The config.json for this model, as transformers and DeepSeek's own code read it."""
        base = {
            "model_type": self.model_type,
            "architectures": [ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.kv_heads,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            base.update(attention_bias=self.attention_bias, mlp_bias=False, head_dim=self.attn_head_dim)
        if self.model_type == "qwen2":
            base.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
            if self.head_dim is not None:
                base["head_dim"] = self.head_dim
        if self.is_mla:
            base.update(
                attention_bias=self.attention_bias,
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                rope_interleave=self.rope_interleave,
                n_routed_experts=self.n_routed_experts,
                n_shared_experts=self.n_shared_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                first_k_dense_replace=self.first_k_dense_replace,
                moe_layer_freq=self.moe_layer_freq,
                n_group=self.n_group,
                topk_group=self.topk_group,
                topk_method=self.topk_method,
                scoring_func=self.scoring_func,
                norm_topk_prob=self.norm_topk_prob,
                routed_scaling_factor=self.routed_scaling_factor,
                num_nextn_predict_layers=self.num_nextn_predict_layers,
                aux_loss_alpha=self.aux_loss_alpha,
                seq_aux=True,
                ep_size=1,
            )
        out = dict(self.extra)
        out.update(base)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_hf(), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}: point at a Hugging Face model folder")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_hf(data, source=str(path))


ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
}

PRESETS: dict[str, dict[str, Any]] = {
    # A DeepSeek-V3 in miniature: MLA with query compression, 1 dense layer then MoE layers with
    # group-limited sigmoid routing and a shared expert, one MTP module. Trains on 2 CPU cores.
    "tiny": dict(
        model_type="deepseek_v3", vocab_size=512, hidden_size=128, intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=96,
        first_k_dense_replace=1, n_group=2, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=1.0, num_nextn_predict_layers=1,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    ),
    # A small dense student (Qwen2 layout), the miniature of R1-Distill-Qwen.
    "tiny-dense": dict(
        model_type="qwen2", vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
    "deepseek-v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
        first_k_dense_replace=3, n_group=8, topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1, aux_loss_alpha=0.0001,
        bos_token_id=0, eos_token_id=1,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
        first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
        norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0, aux_loss_alpha=0.001,
        bos_token_id=100000, eos_token_id=100001,
    ),
    "r1-distill-qwen-1.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=151646, eos_token_id=151643,
    ),
    "r1-distill-qwen-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=151646, eos_token_id=151643,
    ),
    "r1-distill-llama-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
}
