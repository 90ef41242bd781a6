"""Serving metrics with the definitions of vLLM's ``bench serve``.

Per request (times from ``time.perf_counter``, in seconds):

- TTFT: arrival of the first content chunk (non-empty ``choices``) minus send time.
- ITL: gaps between consecutive content chunks; pooled over requests, so the
  statistics weigh chunks, not requests.
- E2EL: arrival of the last content chunk minus send time.
- TPOT: (E2EL - TTFT) / (output tokens - 1), for requests of more than one token.

Aggregates count successful requests only, over the span ``duration`` from the
first send to the last completion. Percentiles are ``numpy.percentile``
(linear interpolation). A request is "good" when it meets every SLO given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the client saw of one streamed request."""

    send_time: float
    prompt_len: int  # tokens the client meant to send; usage.prompt_tokens wins when present
    chunk_times: list[float] = field(default_factory=list)  # arrivals of content chunks
    end_time: float = 0.0  # when the response was fully read (after usage and [DONE])
    output_tokens: int | None = None  # usage.completion_tokens
    prompt_tokens: int | None = None  # usage.prompt_tokens
    text: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)

    @property
    def output_len(self) -> int:
        """Tokens generated: the server's count, else one per content chunk."""
        return self.output_tokens if self.output_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.send_time

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        n = self.output_len
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None


@dataclass
class Stats:
    """Summary of one metric in milliseconds (or the unit the caller passed in)."""

    count: int
    mean: float
    median: float
    std: float
    min: float
    max: float
    percentiles: dict[str, float]  # "p50", "p90", "p99"

    @classmethod
    def of(cls, values: Sequence[float], percentiles: Sequence[float] = PERCENTILES) -> Stats:
        if len(values) == 0:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, {f"p{p:g}": nan for p in percentiles})
        arr = np.asarray(values, dtype=np.float64)
        return cls(
            count=len(arr),
            mean=float(arr.mean()),
            median=float(np.median(arr)),
            std=float(arr.std()),
            min=float(arr.min()),
            max=float(arr.max()),
            percentiles={f"p{p:g}": float(np.percentile(arr, p)) for p in percentiles},
        )


@dataclass
class SLO:
    """Service-level objectives for goodput, in milliseconds; None means not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        checks = (
            (self.ttft_ms, r.ttft),
            (self.tpot_ms, r.tpot or 0.0),  # one-token requests count as TPOT 0, as vLLM does
            (self.e2el_ms, r.e2el),
        )
        return all(limit is None or value * 1000.0 <= limit for limit, value in checks)


@dataclass
class Summary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    goodput: float | None  # requests / s meeting every SLO; None without SLOs
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2el_ms: Stats
    errors: list[str] = field(default_factory=list)  # a few distinct failure messages

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        """Back from ``to_dict`` (extra keys are ignored)."""
        kwargs: dict[str, Any] = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            kwargs[k] = Stats(**d[k])
        return cls(**kwargs)


def span(records: Sequence[RequestRecord]) -> float:
    """First send to last completion, over all requests (failed ones too)."""
    if not records:
        return 0.0
    end = max(max(r.end_time, r.chunk_times[-1] if r.chunk_times else 0.0) for r in records)
    return max(end - min(r.send_time for r in records), 0.0)


def summarize(
    records: Sequence[RequestRecord],
    duration: float | None = None,
    slo: SLO | None = None,
    percentiles: Sequence[float] = PERCENTILES,
) -> Summary:
    """Aggregate the records; ``duration`` defaults to ``span(records)``."""
    good = [r for r in records if r.ok]
    d = span(records) if duration is None else duration
    rate = (lambda n: n / d) if d > 0 else (lambda n: float("nan"))
    n_in = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in good)
    n_out = sum(r.output_len for r in good)
    ms = 1000.0
    return Summary(
        completed=len(good),
        failed=len(records) - len(good),
        duration_s=d,
        total_input_tokens=n_in,
        total_output_tokens=n_out,
        request_throughput=rate(len(good)),
        output_throughput=rate(n_out),
        total_token_throughput=rate(n_in + n_out),
        goodput=rate(sum(slo.met_by(r) for r in good)) if slo is not None else None,
        ttft_ms=Stats.of([r.ttft * ms for r in good], percentiles),
        tpot_ms=Stats.of([t * ms for r in good if (t := r.tpot) is not None], percentiles),
        itl_ms=Stats.of([g * ms for r in good for g in r.itl], percentiles),
        e2el_ms=Stats.of([r.e2el * ms for r in good], percentiles),
        errors=sorted({r.error or "no content chunk" for r in records if not r.ok})[:5],
    )
