"""What each GGUF architecture adds to the common ``{arch}.*`` configuration.

llama.cpp writes Mistral as ``llama`` (a sliding window, when it has one, in
``llama.attention.sliding_window``), keeps Llama 3's RoPE scaling as a
``rope_freqs`` tensor of per-frequency divisors, and hard-codes some Gemma 3
values that its files do not carry: one global layer in six, a RoPE base of
10000 on sliding layers, attention scaled by 1/sqrt(head_dim). The same
values are assumed here. Anything a file states that we do not implement is
refused, naming its key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from model.config import Arch, ConfigError, LayerType, RopeScaling
from model.families import gemma3_layer_types
from model.loading.errors import ModelFileError
from model.loading.ggml_types import GGMLQuantizationType
from model.loading.gguf_format import GGUFHeader

# general.architecture -> our family
ARCHITECTURES: dict[str, Arch] = {
    "llama": "llama",
    "gpt2": "gpt2",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
}
# Architectures whose q/k rows llama.cpp's converter interleaved (its "normal" RoPE).
INTERLEAVED_QK = frozenset({"llama"})
ROPE_FREQS = "rope_freqs.weight"
GEMMA3_SWA_PATTERN = 6  # llama.cpp's hard-coded Gemma 3 interleave
GEMMA3_LOCAL_THETA = 10000.0

Meta = Callable[..., Any]  # gguf_file._meta bound to the header: (key, kind, default)


def family_settings(header: GGUFHeader, arch: str, meta: Meta, n_layer: int) -> dict[str, Any]:
    """Extra ``ModelConfig`` keyword arguments for this file's family."""
    out: dict[str, Any] = {"arch": ARCHITECTURES[arch]}
    if arch == "gpt2":
        return out
    out["rope_scaling"] = _rope_scaling(header, arch, meta)
    window = meta(f"{arch}.attention.sliding_window", int, 0)
    if window < 0:
        raise ModelFileError(
            header.path, "negative sliding window", f"{arch}.attention.sliding_window"
        )
    out["attn_out_bias"] = "blk.0.attn_output.bias" in header.tensors
    if arch == "llama" and window:
        out["arch"] = "mistral"
        out["sliding_window"] = window
    if arch == "gemma3":
        out["sliding_window"] = window
        out["layer_types"] = _layer_types(header, arch, n_layer)
        out["rope_local_theta"] = GEMMA3_LOCAL_THETA
    elif window and arch != "llama":
        raise ModelFileError(
            header.path,
            f"unsupported feature for {arch}: sliding window",
            f"{arch}.attention.sliding_window",
        )
    return out


def _layer_types(header: GGUFHeader, arch: str, n_layer: int) -> tuple[LayerType, ...]:
    key = f"{arch}.attention.sliding_window_pattern"
    pattern = header.metadata.get(key, GEMMA3_SWA_PATTERN)
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        try:
            return gemma3_layer_types(n_layer, pattern)
        except ConfigError as e:
            raise ModelFileError(header.path, str(e), key) from None
    if isinstance(pattern, np.ndarray) and pattern.shape == (n_layer,):
        return tuple("sliding" if bool(s) else "full" for s in pattern.tolist())
    raise ModelFileError(header.path, f"expected an integer or {n_layer} booleans", key)


def _rope_scaling(header: GGUFHeader, arch: str, meta: Meta) -> RopeScaling | None:
    kind = meta(f"{arch}.rope.scaling.type", str, "none")
    freqs = header.tensors.get(ROPE_FREQS)
    if kind not in ("none", "linear"):
        raise ModelFileError(
            header.path, f"unsupported RoPE scaling {kind!r}", f"{arch}.rope.scaling.type"
        )
    if kind == "linear":
        if freqs is not None:
            raise ModelFileError(
                header.path, "both linear RoPE scaling and frequency factors", ROPE_FREQS
            )
        factor = meta(f"{arch}.rope.scaling.factor", float, 1.0)
        try:
            return None if factor == 1.0 else RopeScaling("linear", factor=factor)
        except ConfigError as e:
            raise ModelFileError(header.path, str(e), f"{arch}.rope.scaling.factor") from None
    if freqs is None:
        return None
    try:
        return RopeScaling("factors", freq_factors=_read_freq_factors(header))
    except ConfigError as e:
        raise ModelFileError(header.path, str(e), ROPE_FREQS) from None


def _read_freq_factors(header: GGUFHeader) -> tuple[float, ...]:
    """The ``rope_freqs`` tensor's values (float32, one per frequency: a few hundred bytes)."""
    info = header.tensors[ROPE_FREQS]
    if info.qtype != GGMLQuantizationType.F32 or len(info.shape) != 1 or info.shape[0] > 4096:
        raise ModelFileError(header.path, "expected a float32 vector of at most 4096", ROPE_FREQS)
    try:
        with header.path.open("rb") as f:
            f.seek(info.offset)
            raw = f.read(info.nbytes)
    except OSError as e:
        raise ModelFileError(header.path, f"cannot read ({e})", ROPE_FREQS) from None
    if len(raw) != info.nbytes:
        raise ModelFileError(header.path, "the file changed while it was being loaded", ROPE_FREQS)
    return tuple(float(v) for v in np.frombuffer(raw, dtype="<f4"))
