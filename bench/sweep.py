"""Sweeps of the load generator: one run per concurrency level or request rate."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.loadgen import LoadSpec, Prompt, run
from bench.metrics import SLO, Summary, summarize

log = logging.getLogger(__name__)

Mode = Literal["concurrency", "rate"]


@dataclass
class SweepPoint:
    mode: Mode
    level: float  # concurrency, or requests/s
    summary: Summary
    ttft_ms: list[float] = field(default_factory=list)  # per successful request, for plots

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepPoint:
        """Back from ``to_dict`` (results files), e.g. to redraw plots."""
        return cls(d["mode"], d["level"], Summary.from_dict(d), list(d.get("ttft_all_ms", [])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "level": self.level,
            **self.summary.to_dict(),
            "ttft_all_ms": self.ttft_ms,
        }


@dataclass
class SweepSpec:
    base_url: str
    model: str
    prompts: Sequence[Prompt]  # a pool; each level takes as many as it needs, in order
    output_len: int
    mode: Mode = "concurrency"
    levels: Sequence[float] = (1, 2, 4, 8, 16, 32)
    # An int for every level, or per level; None: 2 x concurrency (at least 4), or the whole pool.
    requests_per_level: int | Mapping[float, int] | None = None
    max_concurrency: int | None = None  # rate mode: client-side cap
    burstiness: float = 1.0
    slo: SLO | None = None
    api_key: str | None = None
    seed: int = 0
    progress: bool = True
    warmup: int = 1  # requests sent (and discarded) before the first level


def requests_at(spec: SweepSpec, level: float) -> int:
    """How many requests the sweep sends at ``level``."""
    if isinstance(spec.requests_per_level, int):
        return spec.requests_per_level
    if spec.requests_per_level is not None and level in spec.requests_per_level:
        return spec.requests_per_level[level]
    if spec.mode == "concurrency":
        return max(4, 2 * int(level))
    return len(spec.prompts)


def _pick(prompts: Sequence[Prompt], n: int, start: int) -> list[Prompt]:
    return [prompts[(start + i) % len(prompts)] for i in range(n)]


def _load(spec: SweepSpec, level: float, prompts: list[Prompt], label: str) -> LoadSpec:
    concurrency = int(level) if spec.mode == "concurrency" else spec.max_concurrency
    return LoadSpec(
        base_url=spec.base_url,
        model=spec.model,
        prompts=prompts,
        output_len=spec.output_len,
        max_concurrency=concurrency,
        request_rate=level if spec.mode == "rate" else math.inf,
        burstiness=spec.burstiness,
        seed=spec.seed,
        api_key=spec.api_key,
        progress=spec.progress,
        label=label,
    )


def run_sweep(spec: SweepSpec) -> list[SweepPoint]:
    if not spec.prompts:
        raise ValueError("a sweep needs at least one prompt")
    if spec.warmup:
        warm = _load(spec, 1, _pick(spec.prompts, spec.warmup, 0), "warmup")
        warm.max_concurrency, warm.request_rate = 1, math.inf
        run(warm)
    points: list[SweepPoint] = []
    used = spec.warmup
    for level in spec.levels:
        n = requests_at(spec, level)
        label = f"{spec.mode} {level:g}"
        result = run(_load(spec, level, _pick(spec.prompts, n, used), label))
        used += n
        summary = summarize(result.records, result.duration_s, spec.slo)
        ttfts = [r.ttft * 1000.0 for r in result.records if r.ok]
        points.append(SweepPoint(spec.mode, float(level), summary, ttfts))
        log.info(
            "%s: %d ok, %d failed, %.1f output tok/s, TTFT p50 %.0f ms",
            label,
            summary.completed,
            summary.failed,
            summary.output_throughput,
            summary.ttft_ms.median,
        )
    return points
