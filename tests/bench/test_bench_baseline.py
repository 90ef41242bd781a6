"""The llama.cpp baseline and server memory in the suite: targets and page with the
baseline measured, skipped or absent; the CPU's vector extensions; ``--only``."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import report, suite
from bench.environment import cpu_isa
from bench.targets import evaluate


def test_isa_and_process_memory_are_read_from_proc_text():
    cpuinfo = (
        "model name\t: X\nflags\t\t: fpu sse avx avx2 fma avx512f avx512bw\nflags : amx_tile\n"
    )
    assert cpu_isa(cpuinfo) == ["AVX2", "FMA", "AVX-512F", "AVX-512BW"]  # the first CPU's
    assert cpu_isa("processor : 0\n") == []
    status = "Name:\tpython\nVmHWM:\t  921600 kB\nVmRSS:\t  409600 kB\n"
    assert suite.parse_status(status) == {"VmHWM": 900.0, "VmRSS": 400.0}


def test_only_runs_the_sections_named_and_writes_outside_docs():
    opts = suite.parse_args(["--only", "llamacpp"])
    assert [n for n in suite.SECTIONS if opts.runs(n)] == ["llamacpp"]
    assert "docs" not in opts.doc.parts and "docs" not in opts.results.parts
    full = suite.parse_args([])
    assert all(full.runs(n) for n in suite.SECTIONS) and full.doc == suite.Options.doc
    with pytest.raises(SystemExit):
        suite.parse_args(["--only", "llama"])


def test_greedy_agreement_counts_the_shared_leading_tokens():
    assert suite.greedy_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert suite.greedy_agreement([1, 2], [1, 2, 3]) == 2


# -- targets and page ------------------------------------------------------------------


def stats(m: float) -> dict:
    return {"median": m, "percentiles": {"p50": m, "p90": m, "p99": m}, "count": 3}


def point(level: float, tps: float, ttft: float, tpot: float) -> dict:
    return {
        "level": level,
        "completed": 3,
        "failed": 0,
        "output_throughput": tps,
        "request_throughput": 0.1,
        "ttft_ms": stats(ttft),
        "tpot_ms": stats(tpot),
        "itl_ms": stats(tpot),
        "e2el_ms": stats(5000.0),
    }


def results(llama: bool = True) -> dict:
    data: dict = {
        "machine": {"cpu": "Some CPU", "cores": 2, "isa": ["AVX2", "AVX-512F"]},
        "http": {
            "sweep": [point(1.0, 30.0, 100.0, 25.0), point(16.0, 240.0, 900.0, 60.0)],
            "ready_s": [1.5, 2.5],
        },
        "memory": {
            "ready_s": 1.0,
            "rss_ready_mib": 700.0,
            "rss_peak_mib": 900.0,
            "completed": 16,
        },
    }
    if llama:
        data["llamacpp"] = {
            "install": {"ok": True, "how": "cached wheel"},
            "version": "0.3.0",
            "prompt_ms": [60.0, 50.0, 40.0],
            "decode_tps": [90.0, 80.0, 100.0],
            "output_tps": [60.0, 70.0, 80.0],
            "new_tokens": [128, 128, 128],
        }
    return data


def by_text(data: dict) -> dict:
    return {r.text: r for r in evaluate(data)}


DECODE = "Single-stream decode: HTTP vs llama.cpp in process, same GGUF"
TTFT = "TTFT at concurrency 1 vs llama.cpp's prompt evaluation"
STREAMS = "HTTP: 16 concurrent streams vs llama.cpp's single stream"


def test_targets_compare_with_llama_cpp_medians_of_the_same_run():
    rows = by_text(results())
    decode = rows[DECODE]  # 1000 / 25 ms = 40 tok/s vs median 90
    assert decode.measured == pytest.approx(40 / 90) and decode.met is False
    ttft = rows[TTFT]  # 100 ms vs median 50 ms
    assert ttft.measured == pytest.approx(2.0) and ttft.met is False
    assert ttft.gap == "missed by 100%"
    streams = rows[STREAMS]  # 240 vs median 70
    assert streams.measured == pytest.approx(240 / 70) and streams.met
    assert rows["RSS of the server once ready"].met is False
    peak = rows["Peak RSS of the server, 16 concurrent ~1,000-token prompts"]
    assert peak.measured == 900.0 and peak.met
    ready = rows["Server ready after start (process start to `/ready` 200)"]
    assert ready.measured == 1.5 and ready.met  # median of 1.5, 2.5 and the memory start, 1.0


def test_without_llama_cpp_its_ratios_are_not_measured_and_the_rest_still_are():
    rows = by_text(results(llama=False))
    for text in (DECODE, TTFT, STREAMS):
        assert rows[text].measured is None and rows[text].met is None, text
        assert "n/a" in rows[text].beside
    assert rows["RSS of the server once ready"].measured == 700.0


def render(data: dict, tmp_path: Path, images: list[Path] | None = None) -> str:
    data["targets"] = [r.to_dict() for r in evaluate(data)]
    doc = tmp_path / "docs" / "benchmarks.md"
    report.write(doc, data, images or [], tmp_path / "r.json")
    return doc.read_text()


def test_page_shows_the_baseline_its_ratios_the_plot_and_the_cpu(tmp_path: Path):
    data = results()
    plot = tmp_path / "docs" / "img" / f"{report.VS_LLAMACPP}.png"
    text = render(data, tmp_path, [plot])
    section = text.split("## llama.cpp baseline")[1].split("\n## ")[0]
    assert "| prompt evaluation / TTFT (ms) | 50 | 60, 50, 40 | 100 | 2.00x |" in section
    assert "installed from the cached wheel" in section
    assert f"![{report.VS_LLAMACPP}](img/{report.VS_LLAMACPP}.png)" in section
    assert text.count(f"img/{report.VS_LLAMACPP}.png") == 1  # not repeated under Plots
    assert "Some CPU (AVX2, AVX-512F)" in text
    assert "## Server memory" in text and "700 MiB" in text
    assert "16 completed" in text
    data["memory"].update(completed=None, timeout_s=300.0)  # the load was cut short
    assert "cut short after 300 s" in render(data, tmp_path)


def test_page_says_why_the_baseline_was_skipped(tmp_path: Path):
    data = results(llama=False)
    data["llamacpp"] = {"skipped": "pip build of llama-cpp-python failed (exit 1):\nno cmake"}
    text = render(data, tmp_path)
    section = text.split("## llama.cpp baseline")[1].split("\n## ")[0]
    assert "**Skipped:**" in section and "no cmake" in section
    assert report.concurrency_curves(data) == []


def test_the_plot_has_both_curves_llama_cpp_flat_at_its_single_stream(tmp_path: Path):
    lines = report.concurrency_curves(results())
    assert [label.split()[0] for label, *_ in lines] == ["gptserve", "llama.cpp"]
    (_, xs, ys, _), (_, lxs, lys, _) = lines
    assert xs == lxs == [1.0, 16.0] and ys == [30.0, 240.0] and lys == [70.0, 70.0]
    from bench import plots

    path = plots.curves(lines, tmp_path / "vs.png", "concurrency", "tok/s", "t")
    assert path.stat().st_size > 0
