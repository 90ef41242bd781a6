"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into our ``GPT``.

Tensors are read through ``safetensors`` (memory-mapped); pickle checkpoints
(``*.bin``, ``*.pt``) are refused, never unpickled. GPT-2 names
(``transformer.h.{i}.attn.c_attn`` ..., Conv1D weights stored (in, out)) and
Llama names (``model.layers.{i}.self_attn.q_proj`` ...) map onto ours; q/k/v and
gate/up are fused by concatenating rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from model.config import ConfigError, ModelConfig
from model.gpt import GPT, WeightsError
from model.loading.errors import ModelConfigFileError, ModelFileError
from model.loading.plan import Part, Plan, check_layer_count, check_plan
from model.quant import QUANTIZE_TO, WeightsMode

INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"(?:model\.layers|(?:transformer\.)?h)\.(\d+)\.")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_hf_dir(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    weights: WeightsMode = "float",
) -> tuple[GPT, ModelConfig]:
    """Build our GPT from a checkpoint directory; ``ModelFileError`` names any bad file or tensor."""
    path = Path(path)
    config = read_hf_config(path)
    files = _weight_files(path)
    with ExitStack() as stack:
        handles = {f: stack.enter_context(_open(f)) for f in files}
        where = _tensor_index(handles)
        key = "n_layer" if config.arch == "gpt2" else "num_hidden_layers"
        check_layer_count(path / "config.json", config.n_layer, where, _LAYER, key)
        plan, ignored = _plan(config, where)
        shapes = {name: tuple(handles[f].get_slice(name).get_shape()) for name, f in where.items()}
        check_plan(path, plan, config, shapes, ignored)
        state = {
            target: _assemble([_get(handles[where[p.name]], p, dtype) for p in parts])
            for target, parts in plan.items()
        }
    fold_norm_offset(config, state)
    try:
        model = GPT.from_state_dict(
            config, state, dtype=dtype, device=device, quantize_to=QUANTIZE_TO.get(weights)
        )
    except WeightsError as e:
        raise ModelFileError(path, str(e)) from e
    return model, config


def fold_norm_offset(config: ModelConfig, state: dict[str, Tensor]) -> None:
    """Gemma's RMSNorm computes x * (1 + w): store 1 + w, so ours computes x * w."""
    if config.norm_offset:
        for name, value in state.items():
            if name.endswith("norm.weight"):
                state[name] = value + config.norm_offset


def read_hf_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    try:
        raw: Any = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(path, "not a checkpoint directory: no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(file, f"unreadable config ({e})") from None
    if not isinstance(raw, dict):
        raise ModelFileError(file, "config is not a JSON object")
    try:
        return ModelConfig.from_hf(raw, name=path.name)
    except KeyError as e:
        raise ModelFileError(file, "missing config key", str(e.args[0])) from None
    except (ConfigError, TypeError, ValueError, AttributeError) as e:
        raise ModelConfigFileError(file, str(e)) from e


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(index, f"unreadable shard index ({e!r})") from None
        files = [path / name for name in names]
        for f in files:
            if not f.is_file() or f.parent != path:
                raise ModelFileError(index, "shard listed in the index is missing", f.name)
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(f.suffix in PICKLE_SUFFIXES for f in path.iterdir()):
        raise ModelFileError(
            path,
            "only pickle weights (*.bin/*.pt) found; they are never loaded (unpickling runs code). "
            "Convert the checkpoint to safetensors.",
        )
    raise ModelFileError(path, "no *.safetensors weights in the directory")


def _open(file: Path) -> Any:
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelFileError(file, f"not a readable safetensors file ({e})") from None


def _tensor_index(handles: dict[Path, Any]) -> dict[str, Path]:
    """Which file holds each tensor; a name in two shards is an error."""
    where: dict[str, Path] = {}
    for file, handle in handles.items():
        for name in handle.keys():
            if name in where:
                raise ModelFileError(file, f"tensor also present in {where[name].name}", name)
            where[name] = file
    return where


def _get(handle: Any, part: Part, dtype: torch.dtype) -> Tensor:
    tensor = handle.get_tensor(part.name)
    return (tensor.t() if part.transposed else tensor).to(dtype)


def _assemble(tensors: list[Tensor]) -> Tensor:
    return tensors[0].contiguous() if len(tensors) == 1 else torch.cat(tensors)


# -- names ----------------------------------------------------------------------------


def _plan(config: ModelConfig, names: dict[str, Path]) -> tuple[Plan, Callable[[str], bool]]:
    """The plan, and which file tensors may go unused: old exports' buffers, a tied head."""
    if config.arch == "gpt2":
        prefix = "transformer." if "transformer.wte.weight" in names else ""
        plan = _gpt2_plan(config, prefix)
        buffers = re.compile(rf"{re.escape(prefix)}h\.\d+\.attn\.(bias|masked_bias)")
    else:
        plan = _llama_plan(config)
        buffers = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
    return plan, lambda n: bool(buffers.fullmatch(n)) or _tied_head(config, n)


def _tied_head(config: ModelConfig, name: str) -> bool:
    # Some checkpoints store the tied head anyway; it is the embedding.
    return config.tie_embeddings and name == "lm_head.weight"


def _linear(
    plan: Plan, ours: str, parts: list[tuple[str, int]], bias: bool | None, conv1d: bool = False
) -> None:
    plan[f"{ours}.weight"] = [
        Part(f"{name}.weight", rows, transposed=conv1d) for name, rows in parts
    ]
    if bias:
        plan[f"{ours}.bias"] = [Part(f"{name}.bias", rows) for name, rows in parts]


def _gpt2_plan(config: ModelConfig, prefix: str) -> Plan:
    c, inner = config.n_embd, config.intermediate_size
    p = prefix
    plan: Plan = {
        "wte.weight": [Part(f"{p}wte.weight", config.vocab_size)],
        "wpe.weight": [Part(f"{p}wpe.weight", config.max_seq_len)],
        "norm.weight": [Part(f"{p}ln_f.weight", c)],
        "norm.bias": [Part(f"{p}ln_f.bias", c)],
    }
    if not config.tie_embeddings:
        plan["lm_head.weight"] = [Part("lm_head.weight", config.vocab_size)]
    for i in range(config.n_layer):
        ours, h = f"layers.{i}.", f"{p}h.{i}."
        for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            plan[f"{ours}{norm}.weight"] = [Part(f"{h}{ln}.weight", c)]
            plan[f"{ours}{norm}.bias"] = [Part(f"{h}{ln}.bias", c)]
        qkv = config.q_size + 2 * config.kv_size
        _linear(plan, f"{ours}attn.qkv", [(f"{h}attn.c_attn", qkv)], True, conv1d=True)
        _linear(plan, f"{ours}attn.proj", [(f"{h}attn.c_proj", c)], True, conv1d=True)
        _linear(plan, f"{ours}mlp.fc", [(f"{h}mlp.c_fc", inner)], True, conv1d=True)
        _linear(plan, f"{ours}mlp.proj", [(f"{h}mlp.c_proj", c)], True, conv1d=True)
    return plan


def _llama_plan(config: ModelConfig) -> Plan:
    """Llama and the families that rename nothing: Qwen 2/3, Mistral, Gemma 3 (whose
    extra norms are ``post_attention_layernorm`` and ``post_feedforward_layernorm``)."""
    c, inner = config.n_embd, config.intermediate_size
    plan: Plan = {
        "wte.weight": [Part("model.embed_tokens.weight", config.vocab_size)],
        "norm.weight": [Part("model.norm.weight", c)],
    }
    if not config.tie_embeddings:
        plan["lm_head.weight"] = [Part("lm_head.weight", config.vocab_size)]
    for i in range(config.n_layer):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        plan[f"{ours}attn_norm.weight"] = [Part(f"{hf}input_layernorm.weight", c)]
        attn = f"{hf}self_attn."
        if config.sandwich_norms:
            norms = {
                "post_attn_norm": "post_attention_layernorm",
                "mlp_norm": "pre_feedforward_layernorm",
                "post_mlp_norm": "post_feedforward_layernorm",
            }
            for ours_norm, theirs in norms.items():
                plan[f"{ours}{ours_norm}.weight"] = [Part(f"{hf}{theirs}.weight", c)]
        else:
            plan[f"{ours}mlp_norm.weight"] = [Part(f"{hf}post_attention_layernorm.weight", c)]
        if config.qk_norm:
            hd = config.head_dim
            plan[f"{ours}attn.q_norm.weight"] = [Part(f"{attn}q_norm.weight", hd)]
            plan[f"{ours}attn.k_norm.weight"] = [Part(f"{attn}k_norm.weight", hd)]
        qkv = [
            (f"{attn}q_proj", config.q_size),
            (f"{attn}k_proj", config.kv_size),
            (f"{attn}v_proj", config.kv_size),
        ]
        _linear(plan, f"{ours}attn.qkv", qkv, config.attn_bias)
        _linear(plan, f"{ours}attn.proj", [(f"{attn}o_proj", c)], config.attn_out_bias)
        mlp = f"{hf}mlp."
        _linear(
            plan,
            f"{ours}mlp.fc",
            [(f"{mlp}gate_proj", inner), (f"{mlp}up_proj", inner)],
            config.mlp_bias,
        )
        _linear(plan, f"{ours}mlp.proj", [(f"{mlp}down_proj", c)], config.mlp_bias)
    return plan
