"""Model configuration: one dataclass for the GPT-2 and Llama families."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Arch = Literal["gpt2", "llama"]
Activation = Literal["gelu_tanh", "gelu", "silu"]


class ConfigError(ValueError):
    """A model configuration that cannot describe a working model."""


# Upper bounds on every size a model file may claim: far above any released model
# (the largest vocabularies hold ~260k tokens, the deepest models ~130 layers, the
# longest contexts 10M tokens), far below what would exhaust memory when sized from.
# Loaders check file metadata against these before planning anything from it.
LIMITS: dict[str, int] = {
    "vocab_size": 1 << 21,
    "n_layer": 1024,
    "n_head": 1024,
    "n_kv_head": 1024,
    "n_embd": 1 << 17,
    "head_dim": 4096,
    "intermediate_size": 1 << 20,
    "max_seq_len": 1 << 24,
}


@dataclass
class ModelConfig:
    """Shapes and flavour of a decoder-only transformer.

    ``arch`` picks the family: ``gpt2`` (learned absolute positions, LayerNorm,
    GELU MLP, biases) or ``llama`` (RoPE, RMSNorm, SwiGLU MLP, grouped-query
    attention). Sizes left at 0 and flags left as ``None`` are derived in
    ``__post_init__``: afterwards every field holds its resolved value, so the
    sizes are plain ints to the rest of the code.
    """

    arch: Arch
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int = 0  # 0: n_head (plain multi-head attention)
    head_dim: int = 0  # 0: n_embd // n_head
    intermediate_size: int = 0  # 0: 4 * n_embd (gpt2 only)
    max_seq_len: int = 2048  # context length: the most positions a sequence may use
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attn_bias: bool | None = None  # None: True for gpt2, False for llama
    mlp_bias: bool | None = None  # None: True for gpt2, False for llama
    activation: Activation | None = None  # None: gelu_tanh for gpt2, silu for llama
    name: str = ""

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ConfigError(f"arch must be 'gpt2' or 'llama', got {self.arch!r}")
        for field, limit in LIMITS.items():
            value = getattr(self, field)
            derived = field in ("n_kv_head", "head_dim", "intermediate_size")  # 0: derived
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{field} must be an integer, got {value!r:.80}")
            if not (0 if derived else 1) <= value <= limit:
                raise ConfigError(f"{field} must be in [1, {limit}], got {value}")
        gpt2 = self.arch == "gpt2"
        if not self.n_kv_head:
            self.n_kv_head = self.n_head
        if self.n_kv_head <= 0 or self.n_head % self.n_kv_head != 0:
            raise ConfigError(
                f"n_head ({self.n_head}) must be a positive multiple of n_kv_head ({self.n_kv_head})"
            )
        if not self.head_dim:
            if self.n_embd % self.n_head != 0:
                raise ConfigError(
                    f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head}); set head_dim"
                )
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim <= 0:
            raise ConfigError(f"head_dim must be positive, got {self.head_dim}")
        if not gpt2 and self.head_dim % 2 != 0:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if not self.intermediate_size:
            if not gpt2:
                raise ConfigError("llama configs need intermediate_size")
            self.intermediate_size = 4 * self.n_embd
        if self.intermediate_size <= 0:
            raise ConfigError(f"intermediate_size must be positive, got {self.intermediate_size}")
        if self.attn_bias is None:
            self.attn_bias = gpt2
        if self.mlp_bias is None:
            self.mlp_bias = gpt2
        if self.activation is None:
            self.activation = "gelu_tanh" if gpt2 else "silu"
        if self.activation not in ("gelu_tanh", "gelu", "silu"):
            raise ConfigError(f"unsupported activation {self.activation!r}")
        for field in ("norm_eps", "rope_theta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{field} must be a number, got {value!r:.80}")
            setattr(self, field, float(value))
        if not (0.0 < self.norm_eps < 1.0):
            raise ConfigError(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        if not (0.0 < self.rope_theta < math.inf):
            raise ConfigError(f"rope_theta must be positive and finite, got {self.rope_theta}")

    # Family traits, derived from arch so that no code switches on names.
    @property
    def learned_positions(self) -> bool:
        return self.arch == "gpt2"

    @property
    def rmsnorm(self) -> bool:
        return self.arch == "llama"

    @property
    def gated_mlp(self) -> bool:
        return self.arch == "llama"

    @property
    def q_size(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_head * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (GPT-2 or Llama)."""
        model_type = hf.get("model_type")
        if model_type == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            activation: Activation
            if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
                activation = "gelu_tanh"
            elif act == "gelu":
                activation = "gelu"
            else:
                raise ConfigError(f"unsupported GPT-2 activation_function {act!r}")
            return cls(
                arch="gpt2",
                vocab_size=hf["vocab_size"],
                n_layer=hf["n_layer"],
                n_head=hf["n_head"],
                n_embd=hf["n_embd"],
                intermediate_size=hf.get("n_inner") or 0,
                max_seq_len=hf.get("n_positions", 1024),
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=hf.get("tie_word_embeddings", True),
                activation=activation,
                name=name,
            )
        if model_type == "llama":
            if hf.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"unsupported hidden_act {hf.get('hidden_act')!r}")
            scaling = hf.get("rope_scaling")
            if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
                raise ConfigError(f"unsupported rope_scaling {scaling!r}")
            theta = hf.get("rope_theta")
            if theta is None:
                theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            attn_bias = hf.get("attention_bias", False)
            return cls(
                arch="llama",
                vocab_size=hf["vocab_size"],
                n_layer=hf["num_hidden_layers"],
                n_head=hf["num_attention_heads"],
                n_embd=hf["hidden_size"],
                n_kv_head=hf.get("num_key_value_heads") or 0,
                head_dim=hf.get("head_dim") or 0,
                intermediate_size=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=theta,
                tie_embeddings=hf.get("tie_word_embeddings", False),
                attn_bias=bool(attn_bias),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                name=name,
            )
        raise ConfigError(
            f"unsupported model_type {model_type!r}: gptserve loads gpt2 and llama checkpoints"
        )
