"""Which tensors of a checkpoint make up each of our parameters, and the checks on them.

A loader describes a checkpoint as a ``Plan``: for every parameter of ``GPT``
the file tensors whose rows, concatenated in order, form it (q, k and v rows
for the fused ``qkv``; gate then up rows for a gated ``fc``). ``check_plan``
then verifies every name and shape before a byte of data is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import ModelConfig
from model.gpt import GPT
from model.loading.errors import ModelFileError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Part:
    """One file tensor supplying ``rows`` rows (dim 0) of one of our parameters."""

    name: str
    rows: int
    heads: int = 0  # > 0: llama.cpp interleaved the RoPE halves of this many heads
    transposed: bool = False  # stored as (in, out), like GPT-2's Conv1D weights

    def file_shape(self, target: Shape) -> Shape:
        shape = (self.rows, *target[1:])
        return shape[::-1] if self.transposed else shape


Plan = dict[str, list[Part]]  # our parameter name -> its parts, in row order


def check_plan(
    path: Path,
    plan: Plan,
    config: ModelConfig,
    in_file: Mapping[str, Shape],
    ignored: Callable[[str], bool] = lambda name: False,
) -> None:
    """Every part present with its exact shape, and no file tensor left unused."""
    targets = GPT.param_shapes(config)
    used: set[str] = set()
    for target, parts in plan.items():
        for part in parts:
            if part.name not in in_file:
                raise ModelFileError(path, f"missing tensor (needed for {target})", part.name)
            want = part.file_shape(targets[target])
            if tuple(in_file[part.name]) != want:
                raise ModelFileError(
                    path,
                    f"tensor has shape {tuple(in_file[part.name])}, expected {want}",
                    part.name,
                )
            used.add(part.name)
    extra = sorted(name for name in in_file if name not in used and not ignored(name))
    if extra:
        raise ModelFileError(path, f"unexpected tensor ({len(extra)} unexpected in all)", extra[0])


def check_layer_count(
    path: Path, claimed: int, names: Iterable[str], layer: re.Pattern[str], key: str
) -> None:
    """The configuration's layer count matches the layers whose tensors the file holds
    (``layer`` captures the index in a tensor name). Checked before anything is built
    per layer, so a file claiming 2**31 layers fails at once."""
    layers = {int(m.group(1)) for name in names if (m := layer.match(name))}
    if claimed != len(layers) or (layers and max(layers) != claimed - 1):
        raise ModelFileError(
            path, f"claims {claimed} layers, but the file holds tensors for {len(layers)}", key
        )


def copy_rows(dst: np.ndarray, src: np.ndarray, heads: int = 0) -> None:
    """``dst[:] = src`` (both (rows, ...)), undoing llama.cpp's RoPE row interleave
    when ``heads`` > 0.

    llama.cpp's converter stores, per head, the rows of the two RoPE halves
    interleaved (a0, b0, a1, b1, ...); our rotate-half RoPE wants them in two
    runs (a0, a1, ..., b0, b1, ...). Works on rows of any width, raw quantized
    bytes included, since llama.cpp quantizes row by row. numpy, not torch:
    these copies are small and many, and torch's per-op thread start-up costs
    more than the copy on a busy machine.
    """
    if heads:
        n = src.shape[0]
        half, rest = n // heads // 2, src.shape[1:]
        # Only dim 0 is split, so both stay views whatever their strides (``src`` may
        # be a field of raw blocks): (heads, 2, half, ...) in both.
        src = src.reshape(heads, half, 2, *rest).swapaxes(1, 2)
        dst = dst.reshape(heads, 2, half, *dst.shape[1:])
    dst[...] = src
