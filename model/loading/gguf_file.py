"""Load a GGUF file (llama.cpp's format) into our ``GPT``.

The header is parsed and checked by ``gguf_format``; the configuration comes
from the ``{arch}.*`` metadata; tensor data is memory-mapped, gathered per
quantization type and dequantized to the target dtype in a few large calls
(``dequant``). Tensor names follow llama.cpp's
converter (``blk.{i}.attn_q.weight`` ...); its q/k row permutation is undone so
our rotate-half RoPE applies. Nothing is unpickled.
"""

from __future__ import annotations

import math
import mmap
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.config import LIMITS, ConfigError, ModelConfig
from model.gpt import GPT, WeightsError
from model.loading.dequant import FLOAT_TYPES, SUPPORTED_TYPES, dequantize
from model.loading.errors import ModelConfigFileError, ModelFileError
from model.loading.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType
from model.loading.gguf_families import (
    ARCHITECTURES,
    INTERLEAVED_QK,
    ROPE_FREQS,
    family_settings,
)
from model.loading.gguf_format import GGUFHeader, GGUFTensorInfo, read_gguf_header
from model.loading.plan import Part, Plan, check_layer_count, check_plan, copy_rows
from model.loading.repack import FIELD_TYPES, KEPT_TYPES, join_rows, repack, repack_fields
from model.quant import QUANTIZE_TO, QuantizedWeight, WeightsMode


def load_gguf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    weights: WeightsMode = "float",
) -> tuple[GPT, ModelConfig]:
    """Build our GPT from a GGUF file; raises ``ModelFileError`` for anything malformed.

    ``weights``: ``auto`` keeps the file's quantized blocks where ``repack`` can
    (the weights of linear layers and the embeddings), ``float`` dequantizes all
    to ``dtype``, ``int8``/``int4`` dequantize and requantize the linear layers.
    """
    header = read_gguf_header(path)
    config = config_from_gguf(header)
    arch = header.metadata["general.architecture"]
    plan = _gpt2_plan(config) if config.arch == "gpt2" else _llama_plan(config, arch)
    shapes = {n: t.shape for n, t in header.tensors.items()}
    # rope_freqs (Llama 3 scaling) is read into the configuration, not a parameter
    check_plan(header.path, plan, config, shapes, lambda name: name == ROPE_FREQS)
    for info in header.tensors.values():
        if info.qtype not in SUPPORTED_TYPES:
            raise ModelFileError(
                header.path, f"unsupported tensor type {info.qtype.name}", info.name
            )
    state = _read_tensors(header, plan, dtype, keep_quantized=weights == "auto")
    try:
        model = GPT.from_state_dict(
            config, state, dtype=dtype, device=device, quantize_to=QUANTIZE_TO.get(weights)
        )
    except WeightsError as e:
        raise ModelFileError(header.path, str(e)) from e
    return model, config


# -- configuration --------------------------------------------------------------------


_REQUIRED = object()


def _meta(header: GGUFHeader, key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """A metadata value of the expected type; ``default`` when absent (if given)."""
    if key not in header.metadata:
        if default is _REQUIRED:
            raise ModelFileError(header.path, "missing metadata key", key)
        return default
    value = header.metadata[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise ModelFileError(header.path, f"expected a {kind.__name__}, got {value!r:.80}", key)
    return value


def _count(header: GGUFHeader, key: str, field: str, default: Any = _REQUIRED) -> int:
    """An integer metadata value within the bound ``ModelConfig`` sets on ``field``."""
    value: int = _meta(header, key, int, default)
    if not (0 if value == default else 1) <= value <= LIMITS[field]:
        raise ModelFileError(header.path, f"{value} is outside [1, {LIMITS[field]}]", key)
    return value


def _layer_count(header: GGUFHeader, key: str) -> int:
    claimed = _count(header, key, "n_layer")
    check_layer_count(header.path, claimed, header.tensors, _LAYER, key)
    return claimed


_LAYER = re.compile(r"blk\.(\d+)\.")


def config_from_gguf(header: GGUFHeader) -> ModelConfig:
    """A ``ModelConfig`` from the file's metadata and tensor shapes."""
    arch = _meta(header, "general.architecture", str)
    if arch not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise ModelFileError(
            header.path,
            f"unsupported architecture {arch!r} (supported: {supported})",
            "general.architecture",
        )
    embd = header.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise ModelFileError(header.path, "missing or malformed tensor", "token_embd.weight")
    norm = "layer_norm_epsilon" if arch == "gpt2" else "layer_norm_rms_epsilon"
    n_head = _count(header, f"{arch}.attention.head_count", "n_head")
    # checked against the file's tensors before anything is sized from it
    n_layer = _layer_count(header, f"{arch}.block_count")

    def meta(key: str, kind: type, default: Any = _REQUIRED) -> Any:
        return _meta(header, key, kind, default)

    family = family_settings(header, arch, meta, n_layer)
    try:
        config = ModelConfig(
            vocab_size=embd.shape[0],
            n_layer=n_layer,
            n_head=n_head,
            n_embd=_count(header, f"{arch}.embedding_length", "n_embd"),
            n_kv_head=_count(header, f"{arch}.attention.head_count_kv", "n_kv_head", n_head),
            head_dim=_count(header, f"{arch}.attention.key_length", "head_dim", 0),
            intermediate_size=_count(header, f"{arch}.feed_forward_length", "intermediate_size"),
            max_seq_len=_count(header, f"{arch}.context_length", "max_seq_len"),
            norm_eps=_meta(header, f"{arch}.attention.{norm}", float, 1e-5),
            rope_theta=_meta(header, f"{arch}.rope.freq_base", float, 10000.0),
            tie_embeddings="output.weight" not in header.tensors,
            attn_bias=any(f"blk.0.attn_{t}.bias" in header.tensors for t in ("q", "qkv")),
            mlp_bias="blk.0.ffn_up.bias" in header.tensors,
            name=_meta(header, "general.name", str, ""),
            **family,
        )
    except ConfigError as e:
        raise ModelConfigFileError(header.path, str(e)) from e
    rope_dims = _meta(header, f"{arch}.rope.dimension_count", int, config.head_dim)
    if not config.learned_positions and rope_dims != config.head_dim:
        raise ModelFileError(
            header.path,
            f"partial RoPE ({rope_dims} of {config.head_dim} dims) is unsupported",
            f"{arch}.rope.dimension_count",
        )
    return config


# -- tensor names ---------------------------------------------------------------------


def _common_plan(config: ModelConfig) -> Plan:
    c = config.n_embd
    plan: Plan = {"wte.weight": [Part("token_embd.weight", config.vocab_size)]}
    norm_params = ("weight", "bias") if config.arch == "gpt2" else ("weight",)
    for p in norm_params:
        plan[f"norm.{p}"] = [Part(f"output_norm.{p}", c)]
    if not config.tie_embeddings:
        plan["lm_head.weight"] = [Part("output.weight", config.vocab_size)]
    for i in range(config.n_layer):
        for p in norm_params:
            plan[f"layers.{i}.attn_norm.{p}"] = [Part(f"blk.{i}.attn_norm.{p}", c)]
            plan[f"layers.{i}.mlp_norm.{p}"] = [Part(f"blk.{i}.ffn_norm.{p}", c)]
        if config.sandwich_norms:  # Gemma 3; llama.cpp already stored its norms as 1 + w
            plan[f"layers.{i}.post_attn_norm.weight"] = [
                Part(f"blk.{i}.post_attention_norm.weight", c)
            ]
            plan[f"layers.{i}.post_mlp_norm.weight"] = [Part(f"blk.{i}.post_ffw_norm.weight", c)]
        if config.qk_norm:
            for t in ("q", "k"):
                plan[f"layers.{i}.attn.{t}_norm.weight"] = [
                    Part(f"blk.{i}.attn_{t}_norm.weight", config.head_dim)
                ]
    return plan


def _linear_params(bias: bool | None) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


def _llama_plan(config: ModelConfig, arch: str) -> Plan:
    plan = _common_plan(config)
    c = config.n_embd
    # llama.cpp interleaved the RoPE halves of q and k rows only for its "llama" RoPE.
    h, kv = (config.n_head, config.n_kv_head) if arch in INTERLEAVED_QK else (0, 0)
    inner = config.intermediate_size
    for i in range(config.n_layer):
        ours, blk = f"layers.{i}.", f"blk.{i}."
        for p in _linear_params(config.attn_bias):
            plan[f"{ours}attn.qkv.{p}"] = [
                Part(f"{blk}attn_q.{p}", config.q_size, heads=h),
                Part(f"{blk}attn_k.{p}", config.kv_size, heads=kv),
                Part(f"{blk}attn_v.{p}", config.kv_size),
            ]
        for p in _linear_params(config.attn_out_bias):
            plan[f"{ours}attn.proj.{p}"] = [Part(f"{blk}attn_output.{p}", c)]
        for p in _linear_params(config.mlp_bias):
            plan[f"{ours}mlp.fc.{p}"] = [
                Part(f"{blk}ffn_gate.{p}", inner),
                Part(f"{blk}ffn_up.{p}", inner),
            ]
            plan[f"{ours}mlp.proj.{p}"] = [Part(f"{blk}ffn_down.{p}", c)]
    return plan


def _gpt2_plan(config: ModelConfig) -> Plan:
    plan = _common_plan(config)
    c, inner = config.n_embd, config.intermediate_size
    plan["wpe.weight"] = [Part("position_embd.weight", config.max_seq_len)]
    for i in range(config.n_layer):
        ours, blk = f"layers.{i}.", f"blk.{i}."
        for p in ("weight", "bias"):
            plan[f"{ours}attn.qkv.{p}"] = [
                Part(f"{blk}attn_qkv.{p}", config.q_size + 2 * config.kv_size)
            ]
            plan[f"{ours}attn.proj.{p}"] = [Part(f"{blk}attn_output.{p}", c)]
            plan[f"{ours}mlp.fc.{p}"] = [Part(f"{blk}ffn_up.{p}", inner)]
            plan[f"{ours}mlp.proj.{p}"] = [Part(f"{blk}ffn_down.{p}", c)]
    return plan


# -- tensor data ----------------------------------------------------------------------

# Values per dequantization call. Few large calls instead of one per tensor: on a
# busy machine the per-call thread synchronisation of small ops costs more than
# the arithmetic. The bound keeps the float32 intermediate small.
_BATCH_VALUES = 1 << 26


@dataclass
class _Param:
    """One of our parameters and the file tensors (same order as its parts) that form it."""

    target: str
    infos: list[GGUFTensorInfo]
    parts: list[Part]

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(info.shape[0] for info in self.infos), *self.infos[0].shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _read_tensors(
    header: GGUFHeader, plan: Plan, dtype: torch.dtype, keep_quantized: bool
) -> dict[str, Tensor | QuantizedWeight]:
    with header.path.open("rb") as f:
        data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
    if data.size != header.file_size:
        raise ModelFileError(header.path, "the file changed while it was being loaded")
    state: dict[str, Tensor | QuantizedWeight] = {}
    by_type: dict[GGMLQuantizationType, list[_Param]] = defaultdict(list)
    for target, parts in plan.items():
        param = _Param(target, [header.tensors[p.name] for p in parts], parts)
        if keep_quantized and _keepable(param):
            state[target] = _repack(data, param)
            continue
        qtypes = {info.qtype for info in param.infos}
        if len(qtypes) == 1 and all(
            len(i.shape) > 1 or i.qtype in FLOAT_TYPES for i in param.infos
        ):
            by_type[qtypes.pop()].append(param)
        else:  # mixed types: rows can only be joined after dequantization
            state[target] = _join_values(data, param).to(dtype)
    for qtype, params in by_type.items():
        for batch in _batches(params):
            state.update(_dequantize_batch(data, qtype, batch, dtype))
    return state


def _batches(params: list[_Param]) -> Iterator[list[_Param]]:
    batch: list[_Param] = []
    size = 0
    for param in params:
        if batch and size + param.numel > _BATCH_VALUES:
            yield batch
            batch, size = [], 0
        batch.append(param)
        size += param.numel
    if batch:
        yield batch


def _dequantize_batch(
    data: np.ndarray, qtype: GGMLQuantizationType, batch: list[_Param], dtype: torch.dtype
) -> dict[str, Tensor]:
    """Parameters of one type: their raw rows gathered (and fixed) into one buffer,
    then dequantized in one call. Rows are fixed on bytes, before dequantization:
    llama.cpp quantizes row by row, so rows stay whole."""
    infos = [info for param in batch for info in param.infos]
    raw = np.empty(sum(info.nbytes for info in infos), dtype=np.uint8)
    pos = 0
    for param in batch:
        for info, part in zip(param.infos, param.parts, strict=True):
            src = _raw(data, info).reshape(info.shape[0], -1)
            copy_rows(raw[pos : pos + info.nbytes].reshape(src.shape), src, part.heads)
            pos += info.nbytes
    values = dequantize(torch.from_numpy(raw), qtype, (sum(param.numel for param in batch),)).to(
        dtype
    )
    chunks = values.split([param.numel for param in batch])
    return {p.target: chunk.view(p.shape) for p, chunk in zip(batch, chunks, strict=True)}


def _keepable(param: _Param) -> bool:
    """Weights of linear layers and embeddings whose every part is a type we compute on."""
    return (
        param.target.endswith(".weight")
        and "norm" not in param.target
        and all(info.qtype in KEPT_TYPES and len(info.shape) == 2 for info in param.infos)
    )


def _repack(data: np.ndarray, param: _Param) -> QuantizedWeight:
    """One parameter's parts, rows fixed on their raw bytes, kept in their blocks."""
    qtypes = {info.qtype for info in param.infos}
    if len(qtypes) == 1 and (qtype := qtypes.pop()) in FIELD_TYPES:
        parts = [
            (_raw(data, i), i.shape[0], p.heads)
            for i, p in zip(param.infos, param.parts, strict=True)
        ]
        return repack_fields(qtype, parts)
    weights = []
    for info, part in zip(param.infos, param.parts, strict=True):
        src = _raw(data, info).reshape(info.shape[0], -1)
        raw = np.empty_like(src)
        copy_rows(raw, src, part.heads)
        type_size = GGML_QUANT_SIZES[info.qtype][1]
        blocks = torch.from_numpy(raw).view(-1, type_size)
        weights.append(repack(blocks, info.qtype, info.shape[0]))
    return join_rows(weights)


def _join_values(data: np.ndarray, param: _Param) -> Tensor:
    out = torch.empty(param.shape)
    row = 0
    for info, part in zip(param.infos, param.parts, strict=True):
        raw = torch.from_numpy(_raw(data, info).copy())
        values = dequantize(raw, info.qtype, info.shape).float()
        copy_rows(out[row : row + info.shape[0]].numpy(), values.numpy(), part.heads)
        row += info.shape[0]
    return out


def _raw(data: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    return data[info.offset : info.offset + info.nbytes]
