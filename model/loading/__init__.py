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


def load_model(
    name_or_path: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Resolve ``name_or_path`` (see ``model.registry``) and load it onto ``device``.

    Raises ``ModelNotFoundError`` when nothing is there and ``ModelFileError``
    when what is there is malformed.
    """
    device = torch.device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    path = resolve_model(name_or_path)
    start = time.perf_counter()
    if path.is_dir():
        model, config = load_hf_dir(path, dtype=dtype, device=device)
    else:
        model, config = load_gguf(path, dtype=dtype, device=device)
    name = name_or_path if name_or_path in KNOWN_MODELS else path.name
    logger.info(
        "loaded %s (%s, %.1fM parameters, %s on %s) in %.2f s",
        name,
        config.arch,
        model.num_params() / 1e6,
        str(dtype).removeprefix("torch."),
        device,
        time.perf_counter() - start,
    )
    return LoadedModel(model=model, config=config, path=path, name=name)
