"""The two probes behind choices in docs/operations.md and bench/notes.md: the int8
activation probe computes the product it claims to, and the KV-dtype table reads what
the measurement found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import int8_probe, kv_dtype_parity
from model.kernels import cpu_flags
from model.quant import quantize

needs_avx2 = pytest.mark.skipif(
    not {"avx2", "fma", "f16c"} <= cpu_flags(), reason="the int8 probe is an AVX2 build"
)


# the probe's builds this CPU runs: AVX2 (maddubs), and AVX-512 VNNI (vpdpbusd) where it has it
PROBE_ISAS = [i for i, need in int8_probe.CPU_NEEDS.items() if need <= cpu_flags()] or ["avx2"]


@needs_avx2
@pytest.mark.parametrize("isa", PROBE_ISAS)
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_int8_probe_computes_the_product_within_int8_error(
    tmp_path: Path, kind: str, isa: str
) -> None:
    lib = int8_probe.build(tmp_path, isa)
    torch.manual_seed(1)
    w = quantize(torch.randn(70, 96) * 0.05, kind)
    x = torch.randn(6, 96)
    ref = x.double() @ w.dequantize().double().T
    exact, probe = torch.empty(6, 70), torch.empty(6, 70)
    int8_probe._call(lib.qmm_q4 if kind == "q4" else lib.qmm_q8, x, w, exact, 0)
    int8_probe._call(lib.probe_q4_i8 if kind == "q4" else lib.probe_q8_i8, x, w, probe)
    rel = lambda y: float((y.double() - ref).norm() / ref.norm())  # noqa: E731
    assert rel(exact) < 1e-5
    # int8 blocks of x: ~1% error, not exactness, and not garbage either
    assert 1e-4 < rel(probe) < 3e-2


@needs_avx2
def test_int8_probe_table_has_a_row_per_layer_and_row_count(tmp_path: Path, monkeypatch) -> None:
    lib = int8_probe.build(tmp_path)
    monkeypatch.setattr(int8_probe, "SHAPES", [(64, 64)])
    results = int8_probe.measure(lib, [1, 5], reps=2)
    text = int8_probe.table(results)
    assert [r["rows"] for r in results] == [1, 5]
    assert text.count("| q4 64x64 |") == 2 and "x |" in text


def test_kv_parity_table_marks_the_reference_and_counts() -> None:
    results = {
        "prompts": 40,
        "dtypes": {
            "float32": {"same_as_float32": 40, "same_as_transformers": 40},
            "float16": {
                "same_as_float32": 40,
                "same_as_transformers": 39,
                "positions": 1984,
                "logit_move_median": 7.3e-3,
                "logit_move_max": 2.8e-2,
                "closeness_max": 0.91,
                "positions_over_half": 2,
            },
        },
    }
    lines = kv_dtype_parity.table(results).splitlines()
    assert lines[2].startswith("| float32 | 40 of 40 | 40 of 40 | 0 (the reference) |")
    assert lines[3] == "| float16 | 40 of 40 | 39 of 40 | 7.3e-03 / 2.8e-02 | 0.91 | 2 of 1984 |"


def test_kv_parity_cuts_a_reference_after_its_first_eos() -> None:
    assert kv_dtype_parity._cut_at_eos([5, 2, 7, 2], frozenset({2})) == [5, 2]
    assert kv_dtype_parity._cut_at_eos([5, 6], frozenset({2})) == [5, 6]


def test_the_compile_candidate_computes_the_q4_layer() -> None:
    """bench.kernels' ``compile q4`` hands torch.compile this function: uncompiled, it
    must give the layer's product, or the timing compares different work."""
    from bench import kernels

    torch.manual_seed(2)
    w = quantize(torch.randn(40, 64) * 0.05, "q4")
    assert w.m is not None
    x = torch.randn(3, 64)
    got = kernels._dequant_linear(x, w.qs, w.d, w.m)
    ref = x.double() @ w.dequantize().double().T
    assert (got.double() - ref).abs().max() < 1e-5
