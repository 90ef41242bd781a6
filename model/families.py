"""Hugging Face ``config.json`` -> ``ModelConfig``, one small function per family.

Each family maps its own keys and refuses, naming the key, any feature it
does not implement, so a checkpoint never loads into a model that computes
something else. Both the Transformers 4 spelling (``rope_theta``,
``rope_scaling``) and the 5 one (``rope_parameters``) are read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from model.config import (
    Activation,
    Arch,
    ConfigError,
    LayerType,
    ModelConfig,
    RopeKind,
    RopeScaling,
)

_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def config_from_hf(hf: dict[str, Any], name: str = "") -> ModelConfig:
    model_type = hf.get("model_type")
    mapper = _MAPPERS.get(model_type) if isinstance(model_type, str) else None
    if mapper is None:
        raise ConfigError(
            f"unsupported model_type {model_type!r}: gptserve loads "
            f"{', '.join(sorted(_MAPPERS))} checkpoints"
        )
    return mapper(hf, name)


def _gpt2(hf: dict[str, Any], name: str) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    activation: Activation
    if act in _TANH_GELU:
        activation = "gelu_tanh"
    elif act == "gelu":
        activation = "gelu"
    else:
        raise ConfigError(f"unsupported GPT-2 activation_function {act!r}")
    return ModelConfig(
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


def _rope(params: dict[str, Any] | None, hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from one ``rope_parameters`` entry or the older top-level keys."""
    params = dict(params or {})
    legacy = hf.get("rope_scaling")
    if isinstance(legacy, dict) and "rope_type" not in params and "type" not in params:
        params.update(legacy)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return float(theta), None
    kinds: dict[str, RopeKind] = {"linear": "linear", "llama3": "llama3", "yarn": "yarn"}
    if kind not in kinds:
        raise ConfigError(f"unsupported rope_scaling type {kind!r} (rope_scaling)")
    if kind == "yarn" and (params.get("mscale") or params.get("mscale_all_dim")):
        raise ConfigError("unsupported rope_scaling: yarn with mscale (DeepSeek-style)")
    if kind == "yarn" and params.get("truncate") is False:
        raise ConfigError("unsupported rope_scaling: yarn with truncate=false")
    original = params.get("original_max_position_embeddings") or 0
    if kind == "yarn" and not original:
        original = hf.get("max_position_embeddings", 0)
    scaling = RopeScaling(
        kind=kinds[kind],
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_seq_len=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=float(params.get("attention_factor") or 0.0),
    )
    return float(theta), scaling


def _layer_types(hf: dict[str, Any], n_layer: int) -> tuple[LayerType, ...]:
    raw = hf.get("layer_types")
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) != n_layer:
        raise ConfigError(f"layer_types must list one type per layer ({n_layer})")
    names: dict[str, LayerType] = {"full_attention": "full", "sliding_attention": "sliding"}
    bad = [t for t in raw if t not in names]
    if bad:
        raise ConfigError(f"unsupported layer type {bad[0]!r} (layer_types)")
    return tuple(names[t] for t in raw)


def _llama_like(
    arch: Arch, hf: dict[str, Any], name: str, *, attn_bias: bool | None = None, **kw: Any
) -> ModelConfig:
    act_key = "hidden_activation" if "hidden_activation" in hf else "hidden_act"
    act = hf.get(act_key) or "silu"
    want = "gelu_tanh" if arch == "gemma3" else "silu"
    if (want == "silu" and act != "silu") or (want == "gelu_tanh" and act not in _TANH_GELU):
        raise ConfigError(f"unsupported {act_key} {act!r} for {arch}")
    if "rope_theta" not in kw:
        params = hf.get("rope_parameters")
        kw["rope_theta"], kw["rope_scaling"] = _rope(
            params if isinstance(params, dict) else None, hf
        )
    return ModelConfig(
        arch=arch,
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        n_kv_head=hf.get("num_key_value_heads") or 0,
        head_dim=hf.get("head_dim") or 0,
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", arch == "gemma3"),
        attn_bias=bool(hf.get("attention_bias", False)) if attn_bias is None else attn_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        name=name,
        **kw,
    )


def _llama(hf: dict[str, Any], name: str) -> ModelConfig:
    return _llama_like("llama", hf, name)


def _mistral(hf: dict[str, Any], name: str) -> ModelConfig:
    return _llama_like("mistral", hf, name, sliding_window=hf.get("sliding_window") or 0)


def _qwen(arch: Arch) -> Callable[[dict[str, Any], str], ModelConfig]:
    def mapper(hf: dict[str, Any], name: str) -> ModelConfig:
        if hf.get("use_sliding_window"):
            raise ConfigError(f"unsupported {arch} feature: use_sliding_window")
        # Qwen 2 always has biases on q, k and v; Qwen 3 follows attention_bias.
        return _llama_like(arch, hf, name, attn_bias=True if arch == "qwen2" else None)

    return mapper


def _gemma3(hf: dict[str, Any], name: str) -> ModelConfig:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise ConfigError(f"unsupported gemma3 feature: {key}")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("unsupported gemma3 feature: use_bidirectional_attention")
    n_layer = hf["num_hidden_layers"]
    types = _layer_types(hf, n_layer)
    if not types:
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        types = gemma3_layer_types(n_layer, int(pattern))
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        theta, scaling = _rope(params.get("full_attention"), {})
        local, local_scaling = _rope(params.get("sliding_attention"), {})
        if local_scaling is not None:
            raise ConfigError("unsupported gemma3 feature: rope scaling on sliding layers")
    else:
        theta, scaling = _rope(None, hf)
        local = float(hf.get("rope_local_base_freq", 10000.0))
    return _llama_like(
        "gemma3",
        hf,
        name,
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local,
        sliding_window=hf.get("sliding_window") or 0,
        layer_types=types,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 0.0),
    )


def gemma3_layer_types(n_layer: int, pattern: int) -> tuple[LayerType, ...]:
    """Gemma 3's interleave: every ``pattern``-th layer global, the others sliding."""
    if pattern <= 0:
        raise ConfigError(f"sliding window pattern must be positive, got {pattern}")
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layer))


def _refuse(feature: str) -> Callable[[dict[str, Any], str], ModelConfig]:
    def mapper(hf: dict[str, Any], name: str) -> ModelConfig:
        raise ConfigError(f"unsupported model: {feature}")

    return mapper


_MAPPERS: dict[str, Callable[[dict[str, Any], str], ModelConfig]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen("qwen2"),
    "qwen3": _qwen("qwen3"),
    "gemma3_text": _gemma3,
    "gemma3": _refuse("gemma3 with a vision tower (model_type 'gemma3'); use a text-only export"),
}


def describe(config: ModelConfig) -> dict[str, Any]:
    """What ``gptserve info`` says about a model's family and how it will run it."""
    from model.config import FAMILIES

    out: dict[str, Any] = {"family": config.arch, "differences": FAMILIES[config.arch]}
    if config.learned_positions:
        return out
    rope = f"base {config.rope_theta:g}"
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        rope += f", {scaling.kind} scaling"
        if scaling.kind != "factors":
            rope += f" x{scaling.factor:g}"
    if config.rope_local_theta and config.rope_local_theta != config.rope_theta:
        rope += f"; sliding layers base {config.rope_local_theta:g}, unscaled"
    out["rope"] = rope
    sliding = [i for i in range(config.n_layer) if config.layer_window(i)]
    if sliding:
        out["attention"] = (
            f"sliding window of {config.sliding_window} tokens on {len(sliding)} of "
            f"{config.n_layer} layers, full attention on the others"
        )
    else:
        out["attention"] = "full causal attention on every layer"
    return out
