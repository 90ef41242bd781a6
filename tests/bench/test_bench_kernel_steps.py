"""``python -m bench.kernels --steps``: the decode step per kernel build, and the
environment it leaves behind."""

from __future__ import annotations

import os

from bench import kernels as bk
from model import kernels as kmod


def test_every_vector_build_is_timed_and_the_choice_is_restored(monkeypatch) -> None:
    monkeypatch.delenv("GPTSERVE_KERNELS", raising=False)
    before = kmod.load()
    result = bk.step_per_build(1, batches=(1,))
    assert set(result) == {i for i in kmod.runnable_isas() if i != "generic"}
    assert all(0 < ms < 10_000 for per in result.values() for ms in per.values())
    assert "GPTSERVE_KERNELS" not in os.environ
    after = kmod.load()
    assert (after.isa if after else None) == (before.isa if before else None)
