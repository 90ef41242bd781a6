"""The performance targets and how each is read from a suite's results.

Every figure is a median over the repetitions of one run, and every ratio
compares measurements taken in that same run. A target whose inputs are
missing (a section failed) is reported as not measured, never as met.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

R = dict[str, Any]


def med(values: Sequence[float] | None) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def get(results: R, *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def sweep_level(results: R, level: float) -> R | None:
    for point in get(results, "http", "sweep") or []:
        if point.get("level") == level:
            return point
    return None


def sweep_tps(results: R, level: float) -> float | None:
    point = sweep_level(results, level)
    return point["output_throughput"] if point and point.get("completed") else None


def decode_tps(point: R | None) -> float | None:
    """A sweep level's decode rate from its median TPOT (the first token excluded)."""
    tpot = get(point or {}, "tpot_ms", "median")
    return 1000.0 / tpot if point and point.get("completed") and tpot else None


def server_starts(r: R) -> list[float]:
    """Every server start of the run: the HTTP section's and the memory section's."""
    starts = list(get(r, "http", "ready_s") or [])
    memory = get(r, "memory", "ready_s")
    return starts + ([memory] if memory is not None else [])


def figures(r: R) -> dict[str, float | None]:
    """The medians the targets are read from, by name."""
    c1 = sweep_level(r, 1) or {}
    return {
        "ready_s": med(get(r, "load", "ready_s")),
        "rss_mib": med(get(r, "load", "maxrss_mib")),
        "hf_load_s": get(r, "offline", "hf_load_s"),
        "bare_tps": med(get(r, "offline", "bare_tps")),
        "hf_tps": med(get(r, "offline", "hf_tps", "1")),
        "step_1": med(get(r, "offline", "step_tps", "1")),
        "step_16": med(get(r, "offline", "step_tps", "16")),
        "bare_ms": med(get(r, "offline", "bare_token_latency_ms")),
        "engine_1": med(get(r, "engine", "tps_1")),
        "engine_16": med(get(r, "engine", "tps_16")),
        "engine_tpot": med(get(r, "engine", "tpot_ms")),
        "prefix_first": med(get(r, "engine", "prefix_first_ms")),
        "prefix_second": med(get(r, "engine", "prefix_second_ms")),
        "http_1": sweep_tps(r, 1),
        "http_16": sweep_tps(r, 16),
        "ttft_c1": get(c1, "ttft_ms", "median"),
        "ttft_c1_p99": get(c1, "ttft_ms", "percentiles", "p99"),
        "health_p99": get(r, "http", "health", "latency_ms", "percentiles", "p99"),
        "health_probes": get(r, "http", "health", "latency_ms", "count"),
        "health_tokens": get(r, "http", "health", "prompt_tokens"),
        "server_ready": med(server_starts(r)),
        "http_decode_1": decode_tps(sweep_level(r, 1)),
        "llama_decode": med(get(r, "llamacpp", "decode_tps")),
        "llama_prompt_ms": med(get(r, "llamacpp", "prompt_ms")),
        "llama_tps": med(get(r, "llamacpp", "output_tps")),
        "rss_ready": get(r, "memory", "rss_ready_mib"),
        "rss_peak": get(r, "memory", "rss_peak_mib"),
        "rss_peak_f16": get(r, "memory", "rss_peak_mib_kv_float16"),
    }


@dataclass
class Target:
    """``value`` names a figure; with ``over`` the value is the ratio of the two
    (times 100 for a "%" unit; an "overhead" is that ratio minus one, in %)."""

    issue: int
    text: str
    goal: float
    kind: str  # "min": measured >= goal; "max": measured <= goal
    unit: str  # "x", "s", "ms", "MiB", "%"
    value: str
    over: str | None = None
    beside: str = ""  # a template over the figures, e.g. "{bare_tps} vs {hf_tps} tok/s"
    overhead: bool = False

    def measure(self, f: dict[str, float | None]) -> float | None:
        if self.over is None:
            return f[self.value]
        x = ratio(f[self.value], f[self.over])
        if x is None:
            return None
        if self.overhead:
            return (x - 1) * 100
        return 100 * x if self.unit == "%" else x

    def miss(self, value: float) -> str:
        """By how much: percentage points for targets in %, else relative to the goal."""
        if self.unit == "%":
            return f"missed by {abs(value - self.goal):.1f} points"
        rel = abs(value / self.goal - 1)
        return f"missed by {rel:.0%}" if rel >= 0.01 else f"missed by {rel:.1%}"

    def check(self, results: R) -> TargetRow:
        f = figures(results)
        value = self.measure(f)
        met = (
            None
            if value is None
            else (value >= self.goal if self.kind == "min" else value <= self.goal)
        )
        gap = "" if value is None else "met" if met else self.miss(value)
        sign = ">=" if self.kind == "min" else "<="
        beside = self.beside.format(**{k: _fmt(v) for k, v in f.items()})
        return TargetRow(
            self.issue,
            self.text,
            f"{sign} {self.goal:g} {self.unit}",
            value,
            self.unit,
            met,
            gap,
            beside,
        )


@dataclass
class TargetRow:
    issue: int
    text: str
    goal: str
    measured: float | None
    unit: str
    met: bool | None
    gap: str
    beside: str

    def to_dict(self) -> R:
        return asdict(self)


def _fmt(v: float | None) -> str:
    """Three significant digits, whole numbers from 100 up, "n/a" when missing."""
    if v is None:
        return "n/a"
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


TARGETS: list[Target] = [
    Target(2, "Ready to generate (weights + tokenizer), warm page cache", 3.0, "max", "s", "ready_s",
           beside="transformers loads the same GGUF in {hf_load_s} s"),
    Target(2, "Batch-1 greedy decode vs transformers `generate()`", 2.0, "min", "x", "bare_tps", "hf_tps",
           beside="{bare_tps} vs {hf_tps} tok/s"),
    Target(2, "16-sequence decode step vs 1-sequence step (tokens/s)", 8.0, "min", "x", "step_16", "step_1",
           beside="{step_16} vs {step_1} tok/s"),
    Target(2, "Peak RSS of the loaded-model process", 1024.0, "max", "MiB", "rss_mib"),
    Target(3, "Engine: 16 concurrent streams vs 1 stream (tokens/s)", 6.0, "min", "x", "engine_16", "engine_1",
           beside="{engine_16} vs {engine_1} tok/s"),
    Target(3, "Engine overhead on per-token latency at batch 1", 10.0, "max", "%", "engine_tpot", "bare_ms",
           beside="TPOT {engine_tpot} ms vs bare decode {bare_ms} ms", overhead=True),
    Target(3, "Shared 1,000-token prefix: first request's TTFT / second's", 3.0, "min", "x",
           "prefix_first", "prefix_second", beside="{prefix_first} ms vs {prefix_second} ms"),
    Target(4, "Single stream over HTTP+SSE vs the engine's own rate", 95.0, "min", "%", "http_1", "engine_1",
           beside="{http_1} vs {engine_1} tok/s"),
    Target(4, "`/health` p99 while 8 maximum-length prompts prefill", 50.0, "max", "ms", "health_p99",
           beside="{health_tokens}-token prompts, {health_probes} probes"),
    Target(6, "Single stream over HTTP vs transformers `generate()`", 2.0, "min", "x", "http_1", "hf_tps",
           beside="{http_1} vs {hf_tps} tok/s"),
    Target(6, "TTFT at concurrency 1 (median)", 120.0, "max", "ms", "ttft_c1", beside="p99 {ttft_c1_p99} ms"),
    Target(6, "HTTP: 16 concurrent streams vs 1 stream (output tokens/s)", 6.0, "min", "x", "http_16", "http_1",
           beside="{http_16} vs {http_1} tok/s"),
    Target(10, "Server ready after start (process start to `/ready` 200)", 2.0, "max", "s", "server_ready"),
    Target(10, "Single-stream decode: HTTP vs llama.cpp in process, same GGUF", 1.0, "min", "x",
           "http_decode_1", "llama_decode", beside="{http_decode_1} vs {llama_decode} tok/s"),
    Target(10, "TTFT at concurrency 1 vs llama.cpp's prompt evaluation", 1.0, "max", "x",
           "ttft_c1", "llama_prompt_ms", beside="{ttft_c1} ms vs {llama_prompt_ms} ms"),
    Target(10, "HTTP: 16 concurrent streams vs 1 stream (output tokens/s)", 4.0, "min", "x", "http_16",
           "http_1", beside="{http_16} vs {http_1} tok/s"),
    Target(10, "HTTP: 16 concurrent streams vs llama.cpp's single stream", 2.0, "min", "x",
           "http_16", "llama_tps", beside="{http_16} vs {llama_tps} tok/s"),
    Target(10, "RSS of the server once ready", 450.0, "max", "MiB", "rss_ready"),
    Target(10, "Peak RSS of the server, 16 concurrent ~1,000-token prompts", 1024.0, "max", "MiB",
           "rss_peak"),
    Target(10, "The same with `--kv-cache-dtype float16`", 1024.0, "max", "MiB", "rss_peak_f16"),
]  # fmt: skip


def evaluate(results: R) -> list[TargetRow]:
    return [t.check(results) for t in TARGETS]
