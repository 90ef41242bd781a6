"""Weights kept in quantized blocks and computed on directly.

A ``QuantizedWeight`` holds an (N, K) matrix as blocks of 32 values along K,
each block ``d * q + m`` with float32 ``d`` and ``m`` (``m`` absent for
symmetric formats), kept as float16 where every scale is exactly a float16
(``compact_scales``: GGUF's Q4_0, Q4_1, Q8_0, Q5_0 and Q5_1 store them so). Two storage kinds cover the GGUF types we keep and our own
weight-only quantization of float checkpoints:

- ``q4``: 16 bytes per block, byte j holding value j (low nibble) and value
  j + 16 (high nibble), q in 0..15. GGUF Q4_0, Q4_1 and Q4_K land here.
- ``q8``: 32 int8 per block. GGUF Q8_0, Q5_0, Q5_1 and Q5_K land here.

For every GGUF type above, ``d * q + m`` in float32 equals the reference
dequantization (``d * q`` is exact: a float16 scale times a small integer fits
float32's mantissa; bit for bit but for the sign of zero in Q4_0), so a
``QuantLinear`` computes with exactly the file's weights; activations stay float32. On the CPU the product runs in
our kernels (``model.kernels``); elsewhere, or for many rows at once, the
weight is dequantized and handed to PyTorch's matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.kernels import load as load_kernels

QK = 32  # values per block
Kind = Literal["q4", "q8"]
WeightsMode = Literal["auto", "float", "int8", "int4"]
WEIGHTS_MODES: tuple[WeightsMode, ...] = ("auto", "float", "int8", "int4")
QUANTIZE_TO: dict[str, Kind] = {"int8": "q8", "int4": "q4"}  # modes that quantize float weights

# Rows of x up to which the kernels beat dequantize-then-matmul. With the tiled
# kernel for batches (a tile of weight rows dequantized once, then register tiles of
# 4 x 3 dot products), measured on an AVX2 CPU (docs/benchmarks.md, bench/kernels.py):
# ~1.5-2x MKL's GEMM on dequantized weights at 64 rows, even near 128, behind from 256.
DIRECT_MAX_ROWS = 128


def direct_max_rows(in_features: int) -> int:
    del in_features  # one crossover for every width the tiled kernel was measured at
    return DIRECT_MAX_ROWS


_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8)


def pack_q4(values: Tensor) -> Tensor:
    """(..., 32) values 0..15 per block -> (..., 16) bytes: value j low, value j + 16 high."""
    return values[..., : QK // 2] | (values[..., QK // 2 :] << 4)


def unpack_q4(qs: Tensor) -> Tensor:
    """(N, nb * 16) q4 bytes -> (N, nb, 32) values 0..15, in order (inverse of ``pack_q4``)."""
    n = qs.shape[0]
    shifts = _NIBBLE_SHIFTS.to(qs.device).view(1, 1, 2, 1)
    return ((qs.view(n, -1, 1, QK // 2) >> shifts) & 0x0F).reshape(n, -1, QK)


@dataclass
class QuantizedWeight:
    """An (N, K) weight in blocks of 32 along K (see the module docstring)."""

    kind: Kind
    qs: Tensor  # q4: (N, K // 2) uint8; q8: (N, K) int8
    d: Tensor  # (N, K // 32) float32 or float16
    m: Tensor | None  # (N, K // 32), d's dtype, or None: symmetric

    def __post_init__(self) -> None:
        n, nb = self.d.shape
        per_block = QK // 2 if self.kind == "q4" else QK
        if self.qs.shape != (n, nb * per_block) or (
            self.m is not None and self.m.shape != self.d.shape
        ):
            raise ValueError(
                f"inconsistent {self.kind} weight: qs {tuple(self.qs.shape)}, "
                f"d {tuple(self.d.shape)}"
            )
        if self.d.dtype not in (torch.float32, torch.float16) or (
            self.m is not None and self.m.dtype != self.d.dtype
        ):
            raise ValueError(f"{self.kind} scales must be float32 or float16, d and m alike")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d.shape[0], self.d.shape[1] * QK)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        m = None if self.m is None else self.m.to(device)
        return QuantizedWeight(self.kind, self.qs.to(device), self.d.to(device), m)

    def dequantize(self, rows: Tensor | None = None) -> Tensor:
        """Float32 values (N, K), or only ``rows`` of them (an index tensor)."""
        qs, d, m = self.qs, self.d, self.m
        if rows is not None:
            qs, d = qs.index_select(0, rows), d.index_select(0, rows)
            m = None if m is None else m.index_select(0, rows)
        n, nb = d.shape
        kernels = load_kernels()
        if kernels is not None and qs.device.type == "cpu":
            out = torch.empty(n, nb * QK)
            kernels.dequantize(QuantizedWeight(self.kind, qs, d, m), out)
            return out
        if self.kind == "q4":
            q = unpack_q4(qs)
        else:
            q = qs.view(n, nb, QK)
        w = q.reshape(n, nb, QK).float() * d.float().unsqueeze(-1)
        if m is not None:
            w = w + m.float().unsqueeze(-1)
        return w.view(n, nb * QK)


def compact_scales(w: QuantizedWeight) -> QuantizedWeight:
    """``w`` with float16 scales when every scale is exactly a float16, else ``w``.

    The values do not change; a q4 block then takes 20 bytes instead of 24 (18 with
    no ``m``), and a batch-1 decode, which streams every weight once per token, reads
    that much less."""
    if w.d.dtype == torch.float16:
        return w
    scales = [w.d] if w.m is None else [w.d, w.m]
    halves = [t.to(torch.float16) for t in scales]
    if not all(torch.equal(h.float(), t) for h, t in zip(halves, scales, strict=True)):
        return w
    return QuantizedWeight(w.kind, w.qs, halves[0], halves[1] if w.m is not None else None)


class _QuantModule(nn.Module):
    """Holds a ``QuantizedWeight`` as buffers (they move with .to(), never take gradients)."""

    qs: Tensor
    d: Tensor
    m: Tensor | None

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.kind = weight.kind
        self.register_buffer("qs", weight.qs, persistent=False)
        self.register_buffer("d", weight.d, persistent=False)
        self.register_buffer("m", weight.m, persistent=False)
        self._weight = weight

    @property
    def weight_q(self) -> QuantizedWeight:
        w = self._weight
        if w.qs is not self.qs or w.d is not self.d or w.m is not self.m:  # moved by .to()
            w = self._weight = QuantizedWeight(self.kind, self.qs, self.d, self.m)
        return w


class QuantLinear(_QuantModule):
    """``nn.Linear`` over a ``QuantizedWeight``: y = x @ W^T (+ bias)."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None) -> None:
        super().__init__(weight)
        self.out_features, self.in_features = weight.shape
        self.bias: nn.Parameter | None
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x @ W^T (+ bias); with ``residual`` (a contiguous (..., N) tensor) the
        product is added to it in place and it is returned (a fused residual add)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        kernels = load_kernels()
        direct = (
            kernels is not None
            and rows <= direct_max_rows(self.in_features)
            and x2.device.type == "cpu"
            and x2.dtype == torch.float32
        )
        if kernels is not None and direct and (residual is None or self.bias is None):
            out = torch.empty(rows, self.out_features) if residual is None else residual
            kernels.matmul(x2.contiguous(), self.weight_q, out, accumulate=residual is not None)
            if self.bias is not None:
                out += self.bias
            return out.view(*lead, self.out_features)
        w = self.weight_q.dequantize().to(x2.dtype)
        y = F.linear(x2, w, None if self.bias is None else self.bias.to(x2.dtype))
        y = y.view(*lead, self.out_features)
        return y if residual is None else residual.add_(y)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kind={self.kind}"


class QuantEmbedding(_QuantModule):
    """Embedding rows dequantized on lookup; ``as_linear`` is the tied output layer,
    sharing the same storage."""

    def as_linear(self) -> QuantLinear:
        return QuantLinear(self.weight_q)

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight_q.dequantize(ids.reshape(-1)).view(*ids.shape, -1)


# -- weight-only quantization of float weights --------------------------------------------


def quantize(w: Tensor, kind: Kind) -> QuantizedWeight:
    """Quantize a float (N, K) weight, K a multiple of 32, in blocks of 32 along K.

    ``q8``: symmetric, d = max|w| / 127. ``q4``: asymmetric, d = (max - min) / 15, m = min.
    """
    n, k = w.shape
    if k % QK:
        raise ValueError(f"K = {k} is not a multiple of {QK}")
    blocks = w.detach().float().reshape(n, k // QK, QK)
    if kind == "q8":
        d = blocks.abs().amax(-1) / 127.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = (blocks * inv.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("q8", q.reshape(n, k), d.contiguous(), None)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d = (hi - lo) / 15.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = ((blocks - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    packed = pack_q4(q)  # (n, nb, 16)
    return QuantizedWeight("q4", packed.reshape(n, k // 2), d.contiguous(), lo.contiguous())


def describe_weights(model: nn.Module, dtype: torch.dtype) -> str:
    """How a model holds its linear weights, for people and /info: ``"float32"``, or the
    quantized kinds and their scales' dtype, e.g. ``"q4, q8 blocks (float16 scales)"``."""
    quantized = [m for m in model.modules() if isinstance(m, _QuantModule)]
    if not quantized:
        return str(dtype).removeprefix("torch.")
    kinds = ", ".join(sorted({m.kind for m in quantized}))
    scales = "/".join(sorted({str(m.d.dtype).removeprefix("torch.") for m in quantized}))
    return f"{kinds} blocks ({scales} scales)"
