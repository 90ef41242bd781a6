"""PNG plots of a sweep (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to files only

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from bench.sweep import SweepPoint  # noqa: E402

PCTS = ("p50", "p90", "p99")


def _xlabel(points: Sequence[SweepPoint]) -> str:
    return "concurrent requests" if points[0].mode == "concurrency" else "request rate (req/s)"


def _log2_x(ax: plt.Axes, points: Sequence[SweepPoint]) -> None:
    levels = [p.level for p in points]
    if min(levels) > 0 and max(levels) / min(levels) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [f"{v:g}" for v in levels])


def throughput(points: Sequence[SweepPoint], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p.level for p in points], [p.summary.output_throughput for p in points], "o-")
    _log2_x(ax, points)
    ax.set_xlabel(_xlabel(points))
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def latency_percentiles(points: Sequence[SweepPoint], path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    levels = [p.level for p in points]
    for ax, name in zip(axes, ("ttft_ms", "itl_ms"), strict=True):
        for pct in PCTS:
            ax.plot(
                levels, [getattr(p.summary, name).percentiles[pct] for p in points], "o-", label=pct
            )
        _log2_x(ax, points)
        ax.set_xlabel(_xlabel(points))
        ax.set_ylabel(f"{name.split('_')[0].upper()} (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def ttft_distribution(points: Sequence[SweepPoint], path: Path, title: str) -> Path:
    """Empirical CDF of TTFT, one line per level."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in points:
        if not p.ttft_ms:
            continue
        xs = np.sort(np.asarray(p.ttft_ms))
        ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=f"{p.level:g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 200, 500, 1000 rather than 10^3
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title=_xlabel(points), fontsize="small", loc="lower right")
    return _save(fig, path)


def sweep_plots(points: Sequence[SweepPoint], out_dir: Path, prefix: str, title: str) -> list[Path]:
    """The three standard plots of a sweep, written as ``{prefix}-*.png``."""
    if not points:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        throughput(points, out_dir / f"{prefix}-throughput.png", f"{title}: output throughput"),
        latency_percentiles(points, out_dir / f"{prefix}-latency.png", f"{title}: TTFT and ITL"),
        ttft_distribution(
            points, out_dir / f"{prefix}-ttft-cdf.png", f"{title}: TTFT distribution"
        ),
    ]


def bar_chart(
    labels: Sequence[str], values: Sequence[float], path: Path, ylabel: str, title: str
) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(range(len(values)), values)
    ax.bar_label(bars, fmt="%.1f", fontsize="small")
    ax.set_xticks(range(len(values)), list(labels), rotation=20, ha="right", fontsize="small")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def curves(
    lines: Sequence[tuple[str, Sequence[float], Sequence[float], str]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """Several (label, xs, ys, matplotlib format) curves on one log2 x axis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    levels = sorted({x for _, xs, _, _ in lines for x in xs})
    for label, xs, ys, fmt in lines:
        ax.plot(xs, ys, fmt, label=label)
    if levels and min(levels) > 0 and max(levels) / min(levels) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [f"{v:g}" for v in levels])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
