"""The CPU benchmark suite behind ``make bench``: measures, plots, rewrites docs/benchmarks.md.

Sections, in order (each one's failure is recorded and the rest still run):

1. load: model + tokenizer load time and peak RSS, in fresh child processes;
2. offline: the bare model's greedy loop and decode step vs transformers
   ``generate()`` on the same GGUF, side by side, repeated;
3. engine: gptserve's engine without HTTP (1 and 16 streams, per-token
   overhead over the bare model, prefix-cache TTFT); then structured: JSON-schema
   constrained streams against unconstrained ones at batch 1 and 16, and schema
   compile times (``bench.structured_bench``);
4. llamacpp: llama.cpp (llama-cpp-python, built once from its source
   distribution) in process on the same GGUF and prompts, right before
   gptserve's single-stream HTTP figures; skipped, with the reason, where it
   cannot be built;
5. http: the server as a child process (start-up time, a concurrency sweep
   with the load generator, ``/health`` under long prefills);
6. memory: a fresh server's RSS once ready, and its peak with 16 concurrent
   ~1,000-token prompts.

``--only llamacpp`` (or any sections) runs just those and writes the page,
plots and results under bench/results/, leaving docs/ as it is.

Defaults: default model, float32, 64-token prompts, 128 new tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import llamacpp, offline, plots, report
from bench.environment import REPO, header, usable_cores, write_json
from bench.loadgen import LoadSpec, Prompt, run_load
from bench.metrics import Stats
from bench.prompts import build_prompts, prompt_ids
from bench.server_bench import ServerProcess, health_during_prefill, max_model_len
from bench.sweep import SweepPoint, SweepSpec, run_sweep
from bench.targets import evaluate
from model.registry import DEFAULT_MODEL, resolve_model

log = logging.getLogger("bench.suite")


@dataclass
class Options:
    model: str = DEFAULT_MODEL
    prompt_len: int = 64
    new_tokens: int = 128
    reps: int = 3
    hf_batches: tuple[int, ...] = (1, 8, 32)
    levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    prefix_len: int = 1000
    memory_prompt_len: int = 1000
    memory_new_tokens: int = 64
    memory_streams: int = 16
    memory_timeout_s: float = 300.0  # the peak is read even when the requests are cut short
    kernel_reps: int = 30
    health_window_s: float = 10.0
    doc: Path = REPO / "docs" / "benchmarks.md"
    img_dir: Path = REPO / "docs" / "img"
    results: Path = REPO / "docs" / "img" / "cpu-suite.json"  # committed beside the plots
    skip: frozenset[str] = frozenset()
    render_only: bool = False

    def runs(self, name: str) -> bool:
        return name not in self.skip


@dataclass
class State:
    """What the sections share: the loaded model, the tokenizer, the results so far."""

    opts: Options
    results: dict[str, Any]
    model: Any = None
    tokenizer: Any = None
    sweep: list[SweepPoint] = field(default_factory=list)

    def ids(self, n: int, offset: int = 0) -> list[int]:
        return prompt_ids(self.tokenizer, n, offset)

    def codec(self) -> Any:
        """The tokenizer, loaded from the model file alone when no section loaded it yet."""
        if self.tokenizer is None:
            from model.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_path(resolve_model(self.opts.model))
        return self.tokenizer

    def http_prompts(self) -> list[Prompt]:
        """The HTTP sweep's prompt pool; llama.cpp is given the same prompts' token ids."""
        return build_prompts(self.codec(), self.opts.prompt_len, count=200, seed=1)


@contextmanager
def section(state: State, name: str) -> Iterator[dict[str, Any]]:
    """Time a section into ``results[name]``; a failure is recorded, not raised."""
    out: dict[str, Any] = state.results.setdefault(name, {})
    start = time.perf_counter()
    log.info("== %s", name)
    out["loadavg_before"] = os.getloadavg()  # how busy the machine was: context for the figures
    try:
        yield out
    except Exception as exc:  # one broken section must not lose the others' figures
        log.error("section %s failed:\n%s", name, traceback.format_exc())
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["elapsed_s"] = round(time.perf_counter() - start, 1)
    out["loadavg_after"] = os.getloadavg()


# -- 1. load ----------------------------------------------------------------------------


def run_child(module: str, **flags: Any) -> dict[str, Any]:
    """``python -m module --flag value ...`` in a fresh process; its stdout is one JSON object."""
    result: dict[str, Any] = json.loads(run_child_text(module, **flags))
    return result


def run_child_text(module: str, **flags: Any) -> str:
    """``python -m module --flag value ...`` in a fresh process; its stdout as text."""
    argv = [str(x) for name, value in flags.items() for x in (f"--{name.replace('_', '-')}", value)]
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout.strip()


def load_section(state: State) -> None:
    with section(state, "load") as out:
        # The first run warms the page cache and is dropped.
        runs = [
            run_child("bench.loadcheck", model=state.opts.model) for _ in range(state.opts.reps)
        ]
        runs = runs[1:] or runs
        out["runs"] = runs
        out["ready_s"] = [r["ready_s"] for r in runs]
        out["maxrss_mib"] = [r["maxrss_mib"] for r in runs]


# -- 2. offline -------------------------------------------------------------------------


def offline_section(state: State) -> None:
    from model.loading import load_model
    from model.tokenizer import Tokenizer

    with section(state, "offline") as out:
        loaded = load_model(state.opts.model, dtype=torch.float32, device="cpu")
        state.model, state.tokenizer = loaded.model, Tokenizer.from_path(loaded.path)
        ids = state.ids(state.opts.prompt_len)
        out.update(bare_tps=[], bare_token_latency_ms=[], step_tps={"1": [], "16": []})
        hf = None
        if "hf" not in state.opts.skip:
            hf, out["hf_load_s"] = offline.hf_load(loaded.path)
            out["hf_tps"] = {str(b): [] for b in state.opts.hf_batches}
            ours = list(offline.generate(state.model, ids, 16))
            out["greedy_match"] = ours == offline.hf_greedy_ids(hf, ids, 16)
        for rep in range(state.opts.reps):  # interleaved, so noise hits both sides alike
            log.info("offline rep %d", rep + 1)
            out["bare_tps"].append(
                offline.bare_generate_tps(state.model, ids, state.opts.new_tokens)
            )
            if hf is not None:
                out["hf_tps"]["1"].append(
                    offline.hf_generate_tps(hf, ids, 1, state.opts.new_tokens)
                )
            latency = offline.bare_token_latency(state.model, ids, 32)
            out["bare_token_latency_ms"].append(1000 * latency)
            context = state.opts.prompt_len + state.opts.new_tokens
            for b in (1, 16):
                out["step_tps"][str(b)].append(
                    offline.decode_step_tps(state.model, b, context, iters=10)
                )
        for b in state.opts.hf_batches:
            if hf is not None and b != 1:
                out["hf_tps"][str(b)].append(
                    offline.hf_generate_tps(hf, ids, b, state.opts.new_tokens)
                )
        out["profile_decode_b1"] = profile_decode(state.model, ids)
        del hf
        gc.collect()


def profile_decode(model: Any, ids: list[int], steps: int = 16) -> str:
    """torch.profiler's table of a batch-1 decode (top operators by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        offline.bare_token_latency(model, ids, steps)
    return str(
        prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40
        )
    )


# -- 3. engine --------------------------------------------------------------------------


def engine_section(state: State) -> None:
    """The engine in a child process (see ``bench.engine_bench``), as a user would run it."""
    with section(state, "engine") as out:
        o = state.opts
        out.update(
            run_child(
                "bench.engine_bench",
                model=o.model,
                reps=o.reps,
                prompt_len=o.prompt_len,
                new_tokens=o.new_tokens,
                prefix_len=o.prefix_len,
            )
        )


def structured_section(state: State) -> None:
    """Constrained decoding cost, in a child process (see ``bench.structured_bench``)."""
    with section(state, "structured") as out:
        out.update(
            run_child("bench.structured_bench", model=state.opts.model, reps=state.opts.reps)
        )


# -- 4. llama.cpp -----------------------------------------------------------------------


def llamacpp_section(state: State) -> None:
    """llama.cpp in a child process on the prompts the HTTP sweep sends at concurrency 1
    (its warm-up prompt first, then one per repetition), as the server tokenizes them."""
    with section(state, "llamacpp") as out:
        install = llamacpp.ensure_installed()
        out["install"] = install.to_dict()
        if not install.ok:
            out["skipped"] = install.reason
            log.warning("llama.cpp baseline skipped: %s", install.reason)
            return
        o = state.opts
        codec = state.codec()
        pool = state.http_prompts()[: 1 + o.reps]
        ids = [codec.encode(str(p.prompt), add_special_tokens=True) for p in pool]
        out["model_path"] = str(resolve_model(o.model))
        out.update(
            run_child(
                "bench.llamacpp",
                model_path=out["model_path"],
                prompt_ids=llamacpp.format_prompt_ids(ids),
                new_tokens=o.new_tokens,
                threads=usable_cores(),
            )
        )
        if state.model is not None:  # same greedy tokens? (Q4_1 blocks vs float32 weights)
            ours = list(offline.generate(state.model, ids[1], 16))
            out["greedy_agree"] = greedy_agreement(ours, out["first_tokens"][0])


def greedy_agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- 5. http ----------------------------------------------------------------------------


def http_section(state: State) -> None:
    with section(state, "http") as out:
        opts = state.opts
        out["ready_s"] = []
        prompts = state.http_prompts()
        with ServerProcess(opts.model) as server:
            out["ready_s"].append(server.start())
            # Closed loop: a few requests at 1 and 2, then one full wave per level (CPU time is short).
            counts: dict[float, int] = {
                level: {1: 3, 2: 4}.get(level, level) for level in opts.levels
            }
            spec = SweepSpec(
                server.base_url,
                opts.model,
                prompts,
                opts.new_tokens,
                levels=opts.levels,
                requests_per_level=counts,
            )
            state.sweep = run_sweep(spec)
            out["sweep"] = [p.to_dict() for p in state.sweep]
        # A second start, and a fresh server for the probe.
        with ServerProcess(opts.model) as server:
            out["ready_s"].append(server.start())
            out["health"] = health_probe(state, server.base_url)


def health_probe(state: State, base_url: str) -> dict[str, Any]:
    context = max_model_len(base_url, state.opts.model) or 2048
    n = context - 1  # the longest prompt that still leaves room for one new token
    prompts = build_prompts(state.codec(), n, count=8, seed=2)
    spec = LoadSpec(base_url, state.opts.model, prompts, output_len=1, progress=False)
    probe = asyncio.run(health_during_prefill(spec, prompts, window_s=state.opts.health_window_s))
    return {
        "prompt_tokens": n,
        "latency_ms": Stats.of(probe.latencies_ms).__dict__,
        "failures": probe.failures,
        "finished_in_window": probe.finished,
        "window_s": probe.window_s,
    }


# -- 6. memory --------------------------------------------------------------------------


def rss_mib(pid: int) -> dict[str, float]:
    """A process's resident set now (``VmRSS``) and at its peak (``VmHWM``), in MiB."""
    return parse_status(Path(f"/proc/{pid}/status").read_text())


def parse_status(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB
    return out


def memory_section(state: State) -> None:
    """A fresh server: RSS once ready, then peak RSS through concurrent long prompts;
    once with the default (float32, exact) KV cache, once with a float16 one."""
    with section(state, "memory") as out:
        o = state.opts
        prompts = build_prompts(state.codec(), o.memory_prompt_len, o.memory_streams, seed=3)
        out["streams"], out["new_tokens"] = o.memory_streams, o.memory_new_tokens
        out["prompt_tokens"] = [p.num_tokens for p in prompts]
        out["timeout_s"] = o.memory_timeout_s
        for suffix, args in (("", ()), ("_kv_float16", ("--kv-cache-dtype", "float16"))):
            with ServerProcess(o.model, args=args) as server:
                out["ready_s" + suffix] = server.start()
                assert server.proc is not None
                out["rss_ready_mib" + suffix] = rss_mib(server.proc.pid)["VmRSS"]
                spec = LoadSpec(
                    server.base_url,
                    o.model,
                    prompts,
                    output_len=o.memory_new_tokens,
                    max_concurrency=o.memory_streams,
                    progress=False,
                )
                out["completed" + suffix] = asyncio.run(bounded_load(spec, o.memory_timeout_s))
                mem = rss_mib(server.proc.pid)
            out["rss_after_mib" + suffix], out["rss_peak_mib" + suffix] = mem["VmRSS"], mem["VmHWM"]


def kernels_section(state: State) -> None:
    """The matmul candidates side by side (``bench.kernels``), in a child process."""
    with section(state, "kernels") as out:
        path = state.opts.results.with_name("cpu-kernels.json")
        run_json = run_child_text("bench.kernels", reps=state.opts.kernel_reps, json=path)
        out.update(json.loads(path.read_text(encoding="utf-8")))
        out["table"] = run_json.split("\n", 1)[1] if "\n" in run_json else run_json


async def bounded_load(spec: LoadSpec, timeout_s: float) -> int | None:
    """Completed requests, or None when the load was cancelled after ``timeout_s``
    (cancelling closes the connections, so the server aborts them)."""
    try:
        result = await asyncio.wait_for(run_load(spec), timeout_s)
    except TimeoutError:
        return None
    return sum(r.ok for r in result.records)


# -- driver -----------------------------------------------------------------------------


SECTIONS: dict[str, Callable[[State], None]] = {
    "load": load_section,
    "offline": offline_section,
    "engine": engine_section,
    "structured": structured_section,
    # Right before the HTTP sweep, whose first figures are the single stream's: the ratios
    # to llama.cpp compare measurements taken minutes apart, not a whole suite apart.
    "llamacpp": llamacpp_section,
    "http": http_section,
    "memory": memory_section,
    "kernels": kernels_section,
}


def run_suite(opts: Options, argv: list[str]) -> dict[str, Any]:
    state = State(
        opts, results={**header(argv), "options": {k: str(v) for k, v in opts.__dict__.items()}}
    )
    start = time.perf_counter()
    for name, fn in SECTIONS.items():
        if not opts.runs(name):
            continue
        try:
            fn(state)
        except Exception as exc:  # e.g. the model failed to load: later sections say so
            log.error("%s failed:\n%s", name, traceback.format_exc())
            state.results.setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"
    state.results["elapsed_s"] = round(time.perf_counter() - start, 1)
    publish(state)
    return state.results


def publish(state: State) -> None:
    """Targets, plots, the results file and the page, from ``state.results``."""
    state.results["targets"] = [t.to_dict() for t in evaluate(state.results)]
    images = write_plots(state)
    write_json(state.opts.results, state.results)
    report.write(state.opts.doc, state.results, images, state.opts.results)


def render_only(opts: Options) -> dict[str, Any]:
    """Rebuild the page and plots from an earlier results file (after editing the notes)."""
    results = json.loads(opts.results.read_text(encoding="utf-8"))
    state = State(opts, results=results)
    state.sweep = [SweepPoint.from_dict(p) for p in results.get("http", {}).get("sweep", [])]
    publish(state)
    return results


def write_plots(state: State) -> list[Path]:
    images = plots.sweep_plots(
        state.sweep, state.opts.img_dir, "cpu-http", "gptserve over HTTP, CPU"
    )
    curves = report.concurrency_curves(state.results)
    if curves:
        path = state.opts.img_dir / "cpu-vs-llamacpp.png"
        images.append(
            plots.curves(
                curves,
                path,
                "concurrent streams",
                "output tokens/s",
                "Output tokens/s vs concurrency: gptserve over HTTP and llama.cpp",
            )
        )
    bars = report.throughput_bars(state.results)
    if bars:
        labels, values = zip(*bars, strict=True)
        path = state.opts.img_dir / "cpu-throughput-comparison.png"
        images.append(
            plots.bar_chart(
                labels,
                values,
                path,
                "output tokens/s",
                "Output tokens/s, 64-token prompt, 128 new tokens",
            )
        )
    return images


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--reps", type=int, default=3, help="repetitions of each side-by-side measurement"
    )
    p.add_argument("--levels", default="1,2,4,8,16,32", help="HTTP concurrency levels")
    p.add_argument("--hf-batches", default="1,8,32", help="transformers generate() batch sizes")
    names = ", ".join(SECTIONS)
    p.add_argument("--skip", default="", help=f"comma-separated: {names}, hf")
    p.add_argument(
        "--only",
        default="",
        help=f"comma-separated sections to run, the others skipped ({names}); "
        "the page, plots and results then go to bench/results/ unless given",
    )
    p.add_argument("--doc", type=Path, help=f"default {Options.doc.relative_to(REPO)}")
    p.add_argument("--img-dir", type=Path, help=f"default {Options.img_dir.relative_to(REPO)}")
    p.add_argument("--results", type=Path, help=f"default {Options.results.relative_to(REPO)}")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the page from --results, measure nothing",
    )
    a = p.parse_args(argv)
    skip = {x for x in a.skip.split(",") if x}
    only = {x for x in a.only.split(",") if x}
    unknown = (skip | only) - set(SECTIONS) - {"hf"}
    if unknown:
        p.error(f"unknown sections: {', '.join(sorted(unknown))} (known: {names}, hf)")
    if only:
        skip |= set(SECTIONS) - only
    # A partial run must not overwrite the full run's page: it goes to bench/results/.
    out = REPO / "bench" / "results" if only else None
    return Options(
        model=a.model,
        reps=a.reps,
        levels=_ints(a.levels),
        hf_batches=_ints(a.hf_batches),
        skip=frozenset(skip),
        doc=a.doc or (out / "benchmarks.md" if out else Options.doc),
        img_dir=a.img_dir or (out if out else Options.img_dir),
        results=a.results or (out / "cpu-suite.json" if out else Options.results),
        render_only=a.render_only,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    opts = parse_args(argv)
    if opts.render_only:
        results = render_only(opts)
    else:
        results = run_suite(opts, ["python", "-m", "bench.suite", *argv])
    log.info("wrote %s (suite time %.0f s)", opts.doc, results.get("elapsed_s", 0))
    for row in results["targets"]:
        log.info("issue %d: %s: %s", row["issue"], row["text"], row["gap"] or "not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
