"""bench.kernel_ab: two builds of the kernel source timed side by side."""

from __future__ import annotations

import model.kernels as mk
from bench import kernel_ab


def test_the_same_source_twice_gives_identical_outputs_and_a_row_per_case(tmp_path):
    isa = mk.best_isa()
    base = kernel_ab.build(mk.SOURCE, isa, tmp_path / "base.so")
    new = kernel_ab.build(mk.SOURCE, isa, tmp_path / "new.so")
    results = kernel_ab.compare(base, new, rows=(1, 5), rounds=1)
    assert [(r["layer"].split()[1], r["rows"]) for r in results] == [
        (f"{n}x{k}", m) for n, k in kernel_ab.SHAPES for m in (1, 5)
    ]
    assert all(r["max_diff"] == 0 and r["base_us"] > 0 and r["new_us"] > 0 for r in results)
    assert "| q8 49152x576 | 5 |" in kernel_ab.table(results)


def test_the_base_source_comes_from_git(tmp_path):
    path = kernel_ab.source_at("HEAD", tmp_path / "base.c")
    assert "int qmm_q4(" in path.read_text() or "GEMM(qmm_q4" in path.read_text()
