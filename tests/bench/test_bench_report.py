"""Targets read from a results dict, and the page rendered from it (missing parts included)."""

import json
from pathlib import Path

import pytest

from bench import report
from bench.targets import evaluate


def results() -> dict:
    stats = lambda m: {"median": m, "percentiles": {"p50": m, "p90": m, "p99": m + 1}, "count": 3}  # noqa: E731
    point = lambda level, tps, ttft: {  # noqa: E731
        "level": level,
        "completed": 3,
        "failed": 0,
        "output_throughput": tps,
        "request_throughput": 0.1,
        "ttft_ms": stats(ttft),
        "tpot_ms": stats(40.0),
        "itl_ms": stats(40.0),
        "e2el_ms": stats(5000.0),
    }
    return {
        "command": "python -m bench.suite",
        "machine": {"cpu": "x", "cores": 2},
        "load": {
            "ready_s": [2.0, 4.0, 2.5],
            "maxrss_mib": [900.0],
            "loadavg_before": [1.0, 1.0, 1.0],
        },
        "offline": {
            "bare_tps": [30.0, 31.0, 29.0],
            "hf_tps": {"1": [10.0, 20.0, 15.0]},
            "step_tps": {"1": [25.0], "16": [150.0]},
            "bare_token_latency_ms": [40.0],
        },
        "engine": {
            "tps_1": [24.0],
            "tps_16": [150.0],
            "tpot_ms": [42.0],
            "error": "RuntimeError: boom",
        },
        "http": {"sweep": [point(1.0, 23.0, 100.0), point(16.0, 140.0, 900.0)], "ready_s": [5.0]},
    }


def test_targets_take_medians_and_ratios_of_the_same_run():
    rows = {r.text: r for r in evaluate(results())}
    ready = rows["Ready to generate (weights + tokenizer), warm page cache"]
    assert (ready.measured, ready.met) == (2.5, True)
    vs_hf = rows["Batch-1 greedy decode vs transformers `generate()`"]
    assert vs_hf.measured == 2.0 and vs_hf.met  # 30 / 15: exactly the goal counts as met
    step = rows["16-sequence decode step vs 1-sequence step (tokens/s)"]
    assert step.measured == 6.0 and step.met is False and step.gap == "missed by 25%"
    overhead = rows["Engine overhead on per-token latency at batch 1"]
    assert overhead.measured == pytest.approx(5.0) and overhead.met
    http = rows["Single stream over HTTP+SSE vs the engine's own rate"]
    assert http.measured == pytest.approx(100 * 23 / 24) and http.met
    slow = results()
    slow["offline"]["bare_token_latency_ms"] = [30.0]  # 42 ms vs 30 ms: 40% over a 10% budget
    (over,) = [r for r in evaluate(slow) if r.text == overhead.text]
    assert over.met is False and over.gap == "missed by 30.0 points"
    ttft = rows["TTFT at concurrency 1 (median)"]
    assert ttft.measured == 100.0 and ttft.met
    prefix = rows["Shared 1,000-token prefix: first request's TTFT / second's"]
    assert prefix.measured is None and prefix.met is None  # never reported as met without data
    ready_http = rows["Server ready after start (process start to `/ready` 200)"]
    assert ready_http.met is False and ready_http.gap == "missed by 150%"  # 5 s vs 2 s


def test_page_renders_every_section_and_flags_failures(tmp_path: Path):
    data = results()
    data["targets"] = [r.to_dict() for r in evaluate(data)]
    doc = tmp_path / "docs" / "benchmarks.md"
    report.write(doc, data, [tmp_path / "docs" / "img" / "a.png"], tmp_path / "bench" / "r.json")
    text = doc.read_text()
    for heading in (
        "## This run",
        "## Targets",
        "## Model load",
        "## Engine without HTTP",
        "## Over HTTP",
        "## Plots",
        "## Adding llama.cpp's `llama-server`",
        "## GPU check",
    ):
        assert heading.replace("## ", "") in text, heading
    assert "**This section failed:** `RuntimeError: boom`" in text
    assert "![a](img/a.png)" in text
    assert "[r.json](../bench/r.json)" in text
    assert "**no** (missed by 25%)" in text
    assert "not measured" in text


def test_results_carry_no_machine_paths(tmp_path):
    from bench.environment import REPO, write_json

    out = tmp_path / "r.json"
    write_json(
        out,
        {
            "doc": str(REPO / "docs" / "benchmarks.md"),
            "command": f"python -m bench.kernels --json {REPO}/docs/img/k.json",
            "nested": [{"wheel": "/some/cache/wheels/x-1.0.whl"}],
            "text": "a sentence / with a slash",
        },
    )
    data = json.loads(out.read_text())
    assert data["doc"] == "docs/benchmarks.md"
    assert data["command"] == "python -m bench.kernels --json docs/img/k.json"
    assert data["nested"][0]["wheel"] == "x-1.0.whl"
    assert data["text"] == "a sentence / with a slash"
