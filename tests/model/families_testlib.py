"""Tiny random models of each family, built with transformers, and their GGUF twins.

``build_family`` makes a transformers model whose every weight is random (norms
and biases too); ``write_gguf`` writes the same weights as llama.cpp's converter
would (its tensor names, the q/k row interleave of the ``llama`` architecture,
Gemma's norms stored as 1 + w, Llama 3 scaling as a ``rope_freqs`` tensor), with
``gguf.GGUFWriter``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from gguf import GGUFWriter

VOCAB = 97
CONTEXT = 96
WINDOW = 8  # sliding window of the tiny models: sequences in the tests are longer

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500.0,
}

# family -> (config class, model class, config settings)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_SCALING)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
            },
        ),
    ),
}


def build_family(family: str, seed: int = 0, **overrides: Any) -> Any:
    config_cls, model_cls, settings = FAMILIES[family]
    n_layer = 3 if family == "gemma3" else 2
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(settings)
    kw.update(overrides)
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kw)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if family == "gemma3" else 1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def _interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its ``llama`` architecture (the converter's permute)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_freq_factors(head_dim: int, scaling: dict[str, Any]) -> list[float]:
    """The ``rope_freqs`` values llama.cpp's converter writes for Llama 3 scaling."""
    theta, factor = scaling["rope_theta"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def write_gguf(model: Any, family: str, path: Path) -> Path:
    cfg = model.config
    arch = {"llama3": "llama", "mistral": "llama"}.get(family, family)
    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{family}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    params = cfg.rope_parameters
    full = params.get("full_attention", params)
    w.add_rope_freq_base(float(full["rope_theta"]))
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf_rope_linear())
        w.add_rope_scaling_factor(float(full["factor"]))
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    if family == "gemma3":
        if cfg.query_pre_attn_scalar != head_dim:
            raise ValueError("GGUF has no query_pre_attn_scalar: llama.cpp uses head_dim")
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm" if family == "gemma3" else "ffn_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, value in state.items():
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            out = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            out = f"blk.{i}.{names[module]}.{kind}"
            proj = module.rpartition(".")[2]
            if arch == "llama" and proj in heads:
                value = _interleave(value, heads[proj])
        if family == "gemma3" and name.endswith("norm.weight"):
            value = value + 1.0
        w.add_tensor(out, value.numpy().astype(np.float32))
    if family == "llama3":
        factors = llama3_freq_factors(head_dim, params)
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_rope_linear() -> Any:
    from gguf import RopeScalingType

    return RopeScalingType.LINEAR
