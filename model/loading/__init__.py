"""Load a model by name or path: a Hugging Face checkpoint directory or a GGUF file."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.loading.errors import ModelConfigFileError, ModelFileError
from model.loading.gguf_file import load_gguf
from model.loading.hf import load_hf_dir
from model.quant import WEIGHTS_MODES, WeightsMode
from model.registry import KNOWN_MODELS, ModelNotFoundError, resolve_model

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "ModelConfigFileError",
    "ModelFileError",
    "ModelNotFoundError",
    "default_dtype",
    "load_gguf",
    "load_hf_dir",
    "load_model",
]


@dataclass
class LoadedModel:
    model: GPT
    config: ModelConfig
    path: Path  # the .gguf file or the checkpoint directory
    name: str  # the registry name, or the file / directory name


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (tensor cores, half the memory), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_weights(weights: WeightsMode, device: torch.device) -> WeightsMode:
    """What a weights mode means on ``device``: quantized layers compute on the CPU
    only, so on an accelerator every mode loads float weights (logged)."""
    if weights not in WEIGHTS_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS_MODES)}, got {weights!r}")
    if device.type != "cpu" and weights != "float":
        if weights != "auto":
            logger.warning("weights=%s computes on the CPU only; loading float weights", weights)
        return "float"
    return weights


def load_model(
    name_or_path: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    weights: WeightsMode = "auto",
) -> LoadedModel:
    """Resolve ``name_or_path`` (see ``model.registry``) and load it onto ``device``.

    ``weights`` (see ``model.quant``): ``auto`` keeps a GGUF file's quantized
    blocks on the CPU and loads float weights elsewhere; ``float`` always loads
    float weights; ``int8``/``int4`` quantize float weights on the CPU.
    Raises ``ModelNotFoundError`` when nothing is there and ``ModelFileError``
    when what is there is malformed.
    """
    device = torch.device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    weights = resolve_weights(weights, device)
    path = resolve_model(name_or_path)
    start = time.perf_counter()
    if path.is_dir():
        model, config = load_hf_dir(path, dtype=dtype, device=device, weights=weights)
    else:
        model, config = load_gguf(path, dtype=dtype, device=device, weights=weights)
    name = name_or_path if name_or_path in KNOWN_MODELS else path.name
    quantized = model.quantized_layers()
    logger.info(
        "loaded %s (%s, %.1fM parameters, %s on %s, %d layers quantized in %.0f MB) in %.2f s",
        name,
        config.arch,
        model.num_params() / 1e6,
        str(dtype).removeprefix("torch."),
        device,
        len(quantized),
        sum(layer.weight_q.nbytes for layer in quantized) / 1e6,
        time.perf_counter() - start,
    )
    return LoadedModel(model=model, config=config, path=path, name=name)
