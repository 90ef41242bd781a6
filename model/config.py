"""Model configuration: one dataclass for every family gptserve serves.

A family is the Llama block plus a few named differences (see ``FAMILIES``);
each difference is a property derived from ``arch`` or a field that the
family's checkpoints set (RoPE scaling, sliding windows). Mapping a Hugging
Face ``config.json`` onto this dataclass lives in ``model.families``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Arch = Literal["gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma3"]
Activation = Literal["gelu_tanh", "gelu", "silu"]
LayerType = Literal["full", "sliding"]
RopeKind = Literal["linear", "llama3", "yarn", "factors"]

# What each family changes relative to the Llama block (docs/models.md).
FAMILIES: dict[str, str] = {
    "gpt2": "learned positions, LayerNorm, GELU MLP, biases",
    "llama": "RoPE, RMSNorm, SwiGLU, grouped-query attention (Llama 2/3, SmolLM)",
    "qwen2": "llama + biases on q, k and v",
    "qwen3": "llama + RMSNorm of each q and k head",
    "mistral": "llama + sliding-window attention",
    "gemma3": (
        "llama + norms before and after attention and MLP, (1 + w) RMSNorm (folded into w "
        "at load), embeddings scaled by sqrt(hidden), GeGLU (tanh GELU), q/k norm, "
        "sliding-window layers with their own RoPE base, query_pre_attn_scalar"
    ),
}


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are stretched past the trained context.

    ``linear``: every frequency divided by ``factor``. ``llama3``: low
    frequencies divided by ``factor``, high ones kept, a smooth blend between
    (Llama 3.1/3.2). ``yarn``: the YaRN ramp between ``beta_fast`` and
    ``beta_slow`` rotations, cos/sin scaled by ``attention_factor``.
    ``factors``: each frequency divided by its own factor (a GGUF
    ``rope_freqs`` tensor, which is how llama.cpp stores Llama 3 scaling).
    """

    kind: RopeKind
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0  # yarn: 0 means 0.1 * ln(factor) + 1
    freq_factors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3", "yarn", "factors"):
            raise ConfigError(f"unsupported rope_scaling type {self.kind!r}")
        if not (math.isfinite(self.factor) and 0 < self.factor <= 1024):
            raise ConfigError(f"rope_scaling factor must be in (0, 1024], got {self.factor}")
        if self.kind in ("llama3", "yarn") and self.original_max_seq_len <= 0:
            raise ConfigError(f"{self.kind} rope_scaling needs original_max_position_embeddings")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError("llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor")
        if self.kind == "factors" and not all(
            math.isfinite(f) and f > 0 for f in self.freq_factors
        ):
            raise ConfigError("rope frequency factors must be positive and finite")


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
    activation: Activation | None = None  # None: gelu_tanh for gpt2 and gemma3, else silu
    attn_out_bias: bool | None = None  # None: attn_bias, except qwen2 (biases on q, k, v only)
    rope_scaling: RopeScaling | None = None
    rope_local_theta: float = 0.0  # RoPE base of sliding-window layers; 0: rope_theta
    sliding_window: int = 0  # keys a query sees on sliding layers (itself included); 0: none
    layer_types: tuple[LayerType, ...] = ()  # (): every layer sliding if a window
    query_pre_attn_scalar: float = 0.0  # attention scale 1/sqrt(this); 0: head_dim
    name: str = ""

    def __post_init__(self) -> None:
        if self.arch not in FAMILIES:
            raise ConfigError(f"arch must be one of {', '.join(FAMILIES)}, got {self.arch!r}")
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
                raise ConfigError(f"{self.arch} configs need intermediate_size")
            self.intermediate_size = 4 * self.n_embd
        if self.intermediate_size <= 0:
            raise ConfigError(f"intermediate_size must be positive, got {self.intermediate_size}")
        if self.attn_bias is None:
            self.attn_bias = gpt2
        if self.mlp_bias is None:
            self.mlp_bias = gpt2
        if self.attn_out_bias is None:
            self.attn_out_bias = bool(self.attn_bias) and self.arch != "qwen2"
        if self.activation is None:
            self.activation = "gelu_tanh" if gpt2 or self.arch == "gemma3" else "silu"
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
        self._check_family_fields()

    def _check_family_fields(self) -> None:
        if self.rope_local_theta < 0:
            raise ConfigError(f"rope_local_theta must be >= 0, got {self.rope_local_theta}")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise ConfigError(f"sliding_window must be >= 0, got {self.sliding_window!r}")
        if self.sliding_window >= self.max_seq_len:
            self.sliding_window = 0  # a window as long as the context is no window
        self.layer_types = tuple(self.layer_types)
        if self.layer_types and len(self.layer_types) != self.n_layer:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.n_layer} layers"
            )
        if any(t not in ("full", "sliding") for t in self.layer_types):
            raise ConfigError(f"layer_types must be 'full' or 'sliding', got {self.layer_types}")
        if self.query_pre_attn_scalar < 0:
            raise ConfigError("query_pre_attn_scalar must be >= 0")
        if self.rope_scaling is not None and self.learned_positions:
            raise ConfigError("rope_scaling needs a RoPE family")
        scaling = self.rope_scaling
        if scaling is not None and scaling.kind == "factors":
            if len(scaling.freq_factors) != self.head_dim // 2:
                raise ConfigError(
                    f"{len(scaling.freq_factors)} rope frequency factors for head_dim "
                    f"{self.head_dim} (expected {self.head_dim // 2})"
                )

    # Family traits, derived from arch so that no code switches on names.
    @property
    def learned_positions(self) -> bool:
        return self.arch == "gpt2"

    @property
    def rmsnorm(self) -> bool:
        return self.arch != "gpt2"

    @property
    def gated_mlp(self) -> bool:
        return self.arch != "gpt2"

    @property
    def qk_norm(self) -> bool:
        """RMSNorm over each query and key head before RoPE (Qwen 3, Gemma 3)."""
        return self.arch in ("qwen3", "gemma3")

    @property
    def sandwich_norms(self) -> bool:
        """Norms after attention and after the MLP too, before the residual add (Gemma 3)."""
        return self.arch == "gemma3"

    @property
    def embed_scale(self) -> float:
        """Factor on the token embeddings (Gemma: sqrt(hidden))."""
        return math.sqrt(self.n_embd) if self.arch == "gemma3" else 1.0

    @property
    def norm_offset(self) -> float:
        """What checkpoints leave out of their RMSNorm weights (Gemma computes x * (1 + w))."""
        return 1.0 if self.arch == "gemma3" else 0.0

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

    def layer_window(self, layer: int) -> int:
        """Keys a query of ``layer`` may see (itself included); 0: the whole context."""
        if not self.sliding_window:
            return 0
        if self.layer_types and self.layer_types[layer] == "full":
            return 0
        return self.sliding_window

    def layer_rope_theta(self, layer: int) -> float:
        """RoPE base of ``layer``: sliding layers may have their own (Gemma 3)."""
        if self.layer_types and self.layer_types[layer] == "sliding" and self.rope_local_theta:
            return self.rope_local_theta
        return self.rope_theta

    def layer_rope_scaled(self, layer: int) -> bool:
        """Whether ``layer`` uses ``rope_scaling``: Gemma 3 scales its global layers only."""
        return not (self.rope_local_theta and self.layer_window(layer))

    @property
    def has_sliding_window(self) -> bool:
        return any(self.layer_window(i) for i in range(self.n_layer))

    @property
    def q_size(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_head * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: tuples become lists, ``rope_scaling`` a dict (or None)."""
        out = asdict(self)
        out["layer_types"] = list(self.layer_types)
        if out["rope_scaling"] is not None:
            out["rope_scaling"]["freq_factors"] = list(out["rope_scaling"]["freq_factors"])
        return out

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (see ``model.families``)."""
        from model.families import config_from_hf

        return config_from_hf(hf, name)
