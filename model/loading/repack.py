"""GGUF blocks rearranged into ``QuantizedWeight`` storage, without changing a value.

Each function takes one tensor's raw blocks (n_blocks, type_size) uint8 and its
(N, K) shape, and returns the same weights as ``d * q + m`` blocks of 32. The
scales are the reference dequantizer's own float32 products (``dequant``), so
dequantizing the result gives the same values (``model.quant``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from model.loading.dequant import (
    _BIT_SHIFTS,
    _f16,
    _high_bits,
    _k_scales,
    _low_nibbles_k,
    _split_nibbles,
)
from model.loading.ggml_types import GGMLQuantizationType
from model.loading.plan import copy_rows
from model.quant import QK, Kind, QuantizedWeight, compact_scales, pack_q4, unpack_q4


def _q4_0(b: Tensor, n: int) -> QuantizedWeight:  # d * (q - 8) = d * q + (-8 d), both exact
    d = _f16(b, 0)
    return QuantizedWeight("q4", b[:, 2:].reshape(n, -1), d.view(n, -1), (-8.0 * d).view(n, -1))


def _q4_1(b: Tensor, n: int) -> QuantizedWeight:
    return QuantizedWeight(
        "q4", b[:, 4:].reshape(n, -1), _f16(b, 0).view(n, -1), _f16(b, 2).view(n, -1)
    )


def _q8_0(b: Tensor, n: int) -> QuantizedWeight:
    q = b[:, 2:].contiguous().view(torch.int8)
    return QuantizedWeight("q8", q.reshape(n, -1), _f16(b, 0).view(n, -1), None)


def _q5_0(b: Tensor, n: int) -> QuantizedWeight:
    q = (_split_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return QuantizedWeight("q8", q.reshape(n, -1), _f16(b, 0).view(n, -1), None)


def _q5_1(b: Tensor, n: int) -> QuantizedWeight:
    q = (_split_nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)).to(torch.int8)
    return QuantizedWeight("q8", q.reshape(n, -1), _f16(b, 0).view(n, -1), _f16(b, 2).view(n, -1))


def _k_scales_mins(b: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Per sub-block of 32: scale d * sc and offset -(dmin * mn), as the reference forms them."""
    sc, mn = _k_scales(b[:, 4:16])
    scale = _f16(b, 0) * sc.float()  # (blocks, 8)
    mins = _f16(b, 2) * mn.float()
    return scale.reshape(n, -1), (-mins).reshape(n, -1)


def _q4_k(b: Tensor, n: int) -> QuantizedWeight:
    packed = pack_q4(_low_nibbles_k(b[:, 16:]))  # (blocks, 8, 16) in our layout
    d, m = _k_scales_mins(b, n)
    return QuantizedWeight("q4", packed.reshape(n, -1), d, m)


def _q5_k(b: Tensor, n: int) -> QuantizedWeight:
    qh = (b[:, 16:48].unsqueeze(1) >> _BIT_SHIFTS.view(1, 8, 1)) & 1
    q = (_low_nibbles_k(b[:, 48:]) | (qh << 4)).to(torch.int8)  # (blocks, 8, 32) 0..31
    d, m = _k_scales_mins(b, n)
    return QuantizedWeight("q8", q.reshape(n, -1), d, m)


_REPACKERS: dict[GGMLQuantizationType, Callable[[Tensor, int], QuantizedWeight]] = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
}
KEPT_TYPES = frozenset(_REPACKERS)


def repack(blocks: Tensor, qtype: GGMLQuantizationType, rows: int) -> QuantizedWeight:
    """``blocks``: the raw (n_blocks, type_size) bytes of a tensor with ``rows`` rows."""
    weight = _REPACKERS[qtype](blocks, rows)
    # Own, contiguous storage: nothing may keep the memory-mapped file alive.
    return compact_scales(
        QuantizedWeight(
            weight.kind,
            weight.qs.contiguous().clone(),
            weight.d.contiguous().clone(),
            None if weight.m is None else weight.m.contiguous().clone(),
        )
    )


# Types whose blocks already hold their fields as we keep them (scales in float16,
# values in our order): each field is copied once, straight out of the file.
_FIELDS: dict[GGMLQuantizationType, tuple[Kind, np.dtype]] = {
    GGMLQuantizationType.Q4_0: ("q4", np.dtype([("d", "<f2"), ("qs", "V16")])),
    GGMLQuantizationType.Q4_1: ("q4", np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "V16")])),
    GGMLQuantizationType.Q8_0: ("q8", np.dtype([("d", "<f2"), ("qs", "V32")])),
}
FIELD_TYPES = frozenset(_FIELDS)


def repack_fields(
    qtype: GGMLQuantizationType, parts: Sequence[tuple[np.ndarray, int, int]]
) -> QuantizedWeight:
    """``parts`` of one type in ``FIELD_TYPES`` (raw bytes, rows, RoPE heads to undo as
    ``copy_rows`` does), stacked along N: what ``repack`` then ``join_rows`` give, value
    for value and dtype for dtype, with one copy of each byte instead of four."""
    kind, layout = _FIELDS[qtype]
    n = sum(rows for _, rows, _ in parts)
    nb = parts[0][0].size // layout.itemsize // parts[0][1]
    fields = {name: np.empty((n, nb), layout[name]) for name in layout.names or ()}
    row = 0
    for raw, rows, heads in parts:
        blocks = raw.view(layout).reshape(rows, nb)
        for name, out in fields.items():
            copy_rows(out[row : row + rows], blocks[name], heads)
        row += rows
    qs = torch.from_numpy(fields["qs"].view(np.uint8 if kind == "q4" else np.int8))
    d = torch.from_numpy(fields["d"])
    if qtype == GGMLQuantizationType.Q4_0:  # d * (q - 8): the offset -8 d, as _q4_0 forms it
        d32 = d.float()
        return compact_scales(QuantizedWeight(kind, qs, d32, -8.0 * d32))
    m = torch.from_numpy(fields["m"]) if "m" in fields else None
    if d.isnan().any() or (m is not None and m.isnan().any()):
        # compact_scales keeps float32 scales that do not compare equal to themselves
        return QuantizedWeight(kind, qs, d.float(), None if m is None else m.float())
    return QuantizedWeight(kind, qs, d, m)


def common_kind(kinds: set[str]) -> str:
    """q4 parts join as q4; anything with a q8 part joins as q8 (q4 values fit int8)."""
    return "q4" if kinds == {"q4"} else "q8"


def as_q8(w: QuantizedWeight) -> QuantizedWeight:
    """The same values in ``q8`` storage (for joining with q8 parts)."""
    if w.kind == "q8":
        return w
    n, nb = w.d.shape
    q = unpack_q4(w.qs)
    return QuantizedWeight("q8", q.reshape(n, nb * QK).to(torch.int8), w.d, w.m)


def join_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along N (q, k, v into qkv; gate and up into fc)."""
    if len(parts) == 1:
        return parts[0]
    kind = common_kind({p.kind for p in parts})
    if kind == "q8":
        parts = [as_q8(p) for p in parts]
    # Scales join in float32 (exact for both dtypes), then go back to float16 if they all fit.
    m = None
    if any(p.m is not None for p in parts):
        m = torch.cat(
            [
                torch.zeros_like(p.d, dtype=torch.float32) if p.m is None else p.m.float()
                for p in parts
            ]
        )
    d = torch.cat([p.d.float() for p in parts])
    return compact_scales(QuantizedWeight(parts[0].kind, torch.cat([p.qs for p in parts]), d, m))
