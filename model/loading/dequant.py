"""Vectorised dequantization of GGML tensor data, in torch.

Each function takes the raw blocks of one tensor as a (n_blocks, type_size)
uint8 tensor and returns (n_blocks, block_size) float32 values computed with
the same float32 operations, in the same order, as the reference numpy code
in ``gguf.quants`` (so results are bit-identical), only without its per-row
Python loop: loading the default model takes a fraction of a second instead of
several seconds. Block layouts are ggml's (``ggml-common.h``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from model.loading.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256  # values per K-quant super-block
_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
_CRUMB_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The float16 stored at byte ``start`` of every block, as float32 (n_blocks, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _split_nibbles(qs: Tensor) -> Tensor:
    """(n, 16) bytes -> (n, 32) values: element j is byte j's low nibble, 16 + j its high one."""
    return ((qs.unsqueeze(1) >> _NIBBLE_SHIFTS.view(1, 2, 1)) & 0x0F).reshape(qs.shape[0], -1)


def _high_bits(qh: Tensor) -> Tensor:
    """(n, 4) bytes of a little-endian uint32 -> its 32 bits, bit i at index i: (n, 32)."""
    return ((qh.unsqueeze(-1) >> _BIT_SHIFTS) & 1).reshape(qh.shape[0], 32)


def _q4_0(b: Tensor) -> Tensor:  # d: f16, qs: 16 bytes
    q = _split_nibbles(b[:, 2:]).to(torch.int8) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b: Tensor) -> Tensor:  # d, m: f16, qs: 16 bytes
    q = torch.empty(b.shape[0], 2, 16)
    # Writing the two halves into a float buffer skips the uint8 intermediates (measured:
    # docs/benchmarks.md, Analysis).
    q[:, 0] = b[:, 4:] & 0x0F
    q[:, 1] = b[:, 4:] >> 4
    return q.view(b.shape[0], 32).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b: Tensor) -> Tensor:  # d: f16, qh: 4 bytes, qs: 16 bytes
    q = _split_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.to(torch.int8) - 16).float()


def _q5_1(b: Tensor) -> Tensor:  # d, m: f16, qh: 4 bytes, qs: 16 bytes
    q = _split_nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _q8_0(b: Tensor) -> Tensor:  # d: f16, qs: 32 int8
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _k_scales(scales: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and 8 six-bit mins packed in 12 bytes (Q4_K, Q5_K)."""
    d, m, m_d = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)  # (n, 8)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _low_nibbles_k(qs: Tensor) -> Tensor:
    """(n, 128) bytes -> (n, 8, 32): each 32 bytes give 32 low nibbles, then 32 high."""
    q = qs.reshape(qs.shape[0], 4, 1, 32) >> _NIBBLE_SHIFTS.view(1, 1, 2, 1)
    return (q & 0x0F).reshape(qs.shape[0], 8, 32)


def _q4_k(b: Tensor) -> Tensor:  # d, dmin: f16, scales: 12 bytes, qs: 128 bytes
    sc, mn = _k_scales(b[:, 4:16])
    scale = (_f16(b, 0) * sc.float()).unsqueeze(-1)  # (n, 8, 1)
    mins = (_f16(b, 2) * mn.float()).unsqueeze(-1)
    return (scale * _low_nibbles_k(b[:, 16:]).float() - mins).reshape(b.shape[0], QK_K)


def _q5_k(b: Tensor) -> Tensor:  # d, dmin: f16, scales: 12, qh: 32, qs: 128 bytes
    sc, mn = _k_scales(b[:, 4:16])
    scale = (_f16(b, 0) * sc.float()).unsqueeze(-1)
    mins = (_f16(b, 2) * mn.float()).unsqueeze(-1)
    qh = (b[:, 16:48].unsqueeze(1) >> _BIT_SHIFTS.view(1, 8, 1)) & 1  # (n, 8, 32)
    q = _low_nibbles_k(b[:, 48:]) | (qh << 4)
    return (scale * q.float() - mins).reshape(b.shape[0], QK_K)


def _q6_k(b: Tensor) -> Tensor:  # ql: 128, qh: 64, scales: 16 int8, d: f16
    n = b.shape[0]
    ql = (b[:, :128].reshape(n, 2, 1, 64) >> _NIBBLE_SHIFTS.view(1, 1, 2, 1)) & 0x0F
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> _CRUMB_SHIFTS.view(1, 1, 4, 1)) & 0x03
    q = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    scales = b[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    scale = (_f16(b, 208) * scales).unsqueeze(-1)  # (n, 16, 1)
    return (scale * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[Tensor], Tensor]] = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}
_FLOATS: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
FLOAT_TYPES = frozenset(_FLOATS)
SUPPORTED_TYPES = frozenset(_DEQUANTIZERS) | FLOAT_TYPES


def dequantize(raw: Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> Tensor:
    """Values of a tensor of ``shape`` (numpy order) from its raw uint8 bytes.

    Float types keep their dtype (the caller converts once, to its target);
    quantized types come back as float32. ``raw`` must hold exactly the
    tensor's bytes; the caller has validated sizes.
    """
    if raw.storage_offset() % 8:
        raw = raw.clone()  # typed views need an aligned start
    raw = raw.contiguous()
    if qtype in _FLOATS:
        return raw.view(_FLOATS[qtype]).reshape(shape)
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(-1, type_size)
    return _DEQUANTIZERS[qtype](blocks).reshape(shape)
