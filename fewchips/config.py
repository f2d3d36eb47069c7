"""The model configuration: one dataclass whose fields are the Hugging Face `deepseek_v3` config.json keys.

Every DeepSeek quirk is a named field with the released default; nothing is keyed on a model width.
Presets go from a laptop-sized `tiny` to the 671B `v3` release (its config.json).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
ROPE_TYPES = ("default", "yarn")

# Keys that Hugging Face configs carry for their own plumbing; accepted and dropped on load.
_HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "auto_map", "torch_dtype", "dtype",
    "use_cache", "pretraining_tp", "rope_interleave", "attention_dropout", "attention_bias",
    "_name_or_path", "output_router_logits", "aux_loss_alpha", "seq_aux", "ep_size",
    "num_key_value_heads", "hidden_act", "initializer_range", "pad_token_id", "head_dim",
    "qk_head_dim", "return_dict", "output_hidden_states", "output_attentions", "id2label",
    "label2id", "problem_type", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "bos_token_id_", "router_aux_loss_coef", "use_bfloat16", "_attn_implementation_autoset",
}


class ConfigError(ValueError):
    """A config field has a value the model cannot be built from; the message names the field."""


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    intermediate_size: int = 18432            # dense SwiGLU width (first_k_dense_replace layers)
    # MLA
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536            # None: a direct q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    # positions
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default_factory=lambda: {
        "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    # multi-token prediction
    num_nextn_predict_layers: int = 1
    # head, tokens, storage
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    initializer_range: float = 0.006          # the report's init std (config.json legacy value is 0.02)
    quantization_config: dict | None = None

    def __post_init__(self):
        self._normalise_rope()
        self._validate()

    # ---- derived ---------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        return rs if rs and rs.get("type") == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """(d_h + d_h^R)^-1/2, times mscale(s, mscale_all_dim)^2 under YaRN (arXiv 2412.19437 §4.3)."""
        scale = self.qk_head_dim ** -0.5
        y = self.yarn
        if y and y.get("mscale_all_dim"):
            m = yarn_mscale(self.yarn_factor, y["mscale_all_dim"])
            scale *= m * m
        return scale

    @property
    def yarn_factor(self) -> float:
        y = self.yarn
        if not y:
            return 1.0
        if y.get("factor") is not None:
            return float(y["factor"])
        return self.max_position_embeddings / y["original_max_position_embeddings"]

    @property
    def kv_cache_elements_per_token(self) -> int:
        """The MLA cache: the normalised latent and the rotated shared rope key, per main layer."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_hidden_layers

    def kv_cache_bytes_per_token(self, element_bytes: int = 2, mtp: bool = False) -> int:
        """Cache bytes per token at `element_bytes` per number (2: bf16), with the MTP layers' own too."""
        layers = self.num_hidden_layers + (self.num_nextn_predict_layers if mtp else 0)
        return (self.kv_lora_rank + self.qk_rope_head_dim) * layers * element_bytes

    # ---- validation --------------------------------------------------------------------------
    def _normalise_rope(self):
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ConfigError(f"rope_scaling must be a mapping or null, got {type(rs).__name__}")
        rs = dict(rs)
        kind = rs.pop("rope_type", None) or rs.get("type") or "default"
        rs["type"] = kind
        if "rope_theta" in rs:   # the newer `rope_parameters` spelling carries theta inside
            self.rope_theta = float(rs.pop("rope_theta"))
        if kind not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling.type={kind!r} is not supported; use one of {ROPE_TYPES}")
        if kind == "default":
            self.rope_scaling = None
            return
        if "original_max_position_embeddings" not in rs:
            raise ConfigError("rope_scaling (yarn) needs original_max_position_embeddings")
        self.rope_scaling = rs

    def _validate(self):
        def need(cond, fieldname, msg):
            if not cond:
                raise ConfigError(f"{fieldname}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                     "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name,
                 f"must be a positive integer, got {v!r}")
        need(isinstance(self.qk_nope_head_dim, int) and self.qk_nope_head_dim >= 0, "qk_nope_head_dim",
             f"must be a non-negative integer, got {self.qk_nope_head_dim!r}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", f"must be a positive integer or null, got {self.q_lora_rank!r}")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func",
             f"unknown value {self.scoring_func!r}; allowed: {', '.join(SCORING_FUNCS)}")
        need(self.topk_method in TOPK_METHODS, "topk_method",
             f"unknown value {self.topk_method!r}; allowed: {', '.join(TOPK_METHODS)}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be between 0 and num_hidden_layers={self.num_hidden_layers}, got {self.first_k_dense_replace}")
        need(self.moe_layer_freq >= 1, "moe_layer_freq", f"must be >= 1, got {self.moe_layer_freq}")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers",
             f"must be >= 0, got {self.num_nextn_predict_layers}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        if not any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)) and self.num_nextn_predict_layers == 0:
            return  # a dense model: the expert fields are unused
        need(self.n_routed_experts >= 1, "n_routed_experts", f"must be >= 1, got {self.n_routed_experts}")
        need(self.moe_intermediate_size >= 1, "moe_intermediate_size",
             f"must be >= 1, got {self.moe_intermediate_size}")
        need(self.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        need(self.n_group >= 1, "n_group", f"must be >= 1, got {self.n_group}")
        need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
             f"{self.n_routed_experts} is not divisible by n_group={self.n_group}")
        need(1 <= self.topk_group <= self.n_group, "topk_group",
             f"must be between 1 and n_group={self.n_group}, got {self.topk_group}")
        per_group = self.n_routed_experts // self.n_group
        reachable = per_group * self.topk_group if self.topk_method != "greedy" else self.n_routed_experts
        need(1 <= self.num_experts_per_tok <= reachable, "num_experts_per_tok",
             f"{self.num_experts_per_tok} experts cannot be chosen from the {reachable} experts in "
             f"topk_group={self.topk_group} groups of {per_group}")
        if self.topk_method == "noaux_tc" and self.n_group > 1:
            need(per_group >= 2, "n_group", f"noaux_tc scores a group by its top-2 experts; "
                 f"n_routed_experts/n_group = {per_group} is fewer than 2")

    # ---- config.json -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        d = dict(d)
        if d.get("model_type") not in (None, "deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"{source}: model_type={d['model_type']!r}; fewchips reads deepseek_v3/deepseek_v2")
        # newer transformers spellings
        if "rope_parameters" in d:
            rp = d.pop("rope_parameters")
            if rp is not None and "rope_scaling" not in d:
                d["rope_scaling"] = rp
        if "num_mtp_layers" in d:
            n = d.pop("num_mtp_layers")
            d.setdefault("num_nextn_predict_layers", n)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names and k not in _HF_BOOKKEEPING]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{source}: unknown config field(s) {', '.join(hints)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no config.json here")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json form (transformers' DeepseekV3Config reads it back)."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        if d["quantization_config"] is None:
            del d["quantization_config"]
        d.update({
            "model_type": "deepseek_v3",
            "architectures": ["DeepseekV3ForCausalLM"],
            "num_key_value_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rope_interleave": True,   # the released weights' rope layout (interleaved pairs)
            "num_mtp_layers": self.num_nextn_predict_layers,
        })
        return d

    def save(self, path: str | os.PathLike):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_SMALL_YARN = None  # small presets train at their native length; YaRN is for context extension

PRESETS: dict[str, dict[str, Any]] = {
    # ~10M parameters (8M main + 2M MTP): CPU demos and tests. Every V3 mechanism is present (groups, bias, MTP).
    "tiny": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, intermediate_size=768,
                 num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                 qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1, moe_intermediate_size=128,
                 n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                 rope_scaling=_SMALL_YARN, max_position_embeddings=2048, num_nextn_predict_layers=1),
    # ~170M total, ~50M activated per token (embeddings included): a laptop-sized research model.
    "small": dict(vocab_size=16384, hidden_size=512, num_hidden_layers=12, intermediate_size=1536,
                  num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                  qk_rope_head_dim=32, v_head_dim=64, first_k_dense_replace=1, moe_intermediate_size=256,
                  n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                  rope_scaling=_SMALL_YARN, max_position_embeddings=4096, num_nextn_predict_layers=1),
    # DeepSeek-V2-Lite shapes (15.7B): softmax gate, no groups, no q compression (arXiv 2405.04434).
    "v2-lite": dict(vocab_size=102400, hidden_size=2048, num_hidden_layers=27, intermediate_size=10944,
                    num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1, moe_intermediate_size=1408,
                    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                    routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy",
                    norm_topk_prob=False,
                    rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
                    max_position_embeddings=163840, num_nextn_predict_layers=0,
                    bos_token_id=100000, eos_token_id=100001),
    # The 671B release exactly (the dataclass defaults are its config.json).
    "v3": dict(),
}
