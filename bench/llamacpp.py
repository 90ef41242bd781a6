"""llama.cpp as a baseline: llama-cpp-python in process, on the same GGUF and prompts.

llama-cpp-python ships only a source distribution, so the first use builds a
wheel from it (cmake and a C++ compiler, a few minutes) into a cache folder,
``.cache/wheels/`` in the repo or ``$GPTSERVE_WHEEL_CACHE``; later runs install
that wheel without building. When the build cannot be done (no compiler, no
network) :func:`ensure_installed` says why and the suite reports the baseline
as skipped.

``python -m bench.llamacpp --model-path X.gguf --prompt-ids "1,2,...;4,5,..."``
measures in a fresh process (the suite's own torch threads stay out of it) and
prints one JSON object: per prompt, the prompt evaluation time (the time to the
first token) and the decode rate of the remaining tokens, greedy, with the
end-of-sequence token ignored. The first prompt is a warm-up and is dropped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "llama-cpp-python"
CACHE_ENV = "GPTSERVE_WHEEL_CACHE"
BUILD_TIMEOUT_S = 3600.0  # the build takes ~10 minutes on two cores

log = logging.getLogger("bench.llamacpp")


def wheel_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or REPO / ".cache" / "wheels")


def cached_wheel(folder: Path) -> Path | None:
    """The newest llama-cpp-python wheel in ``folder``, if any."""
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


def installed_version() -> str | None:
    """llama_cpp's version when it imports (its shared library included), else None."""
    try:
        importlib.invalidate_caches()
        module = importlib.import_module("llama_cpp")
    except (ImportError, OSError) as exc:
        log.debug("llama_cpp does not import: %s", exc)
        return None
    return str(getattr(module, "__version__", "unknown"))


@dataclass
class Install:
    """How llama-cpp-python came to be importable, or why it could not."""

    ok: bool
    how: str  # "installed", "cached wheel", "built", or "failed"
    version: str | None = None
    wheel: str | None = None
    build_s: float | None = None
    reason: str = ""  # when not ok: what went wrong, with the tail of the tool's output

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# llama.cpp builds for the CPU it is built on (-march=native). On a Xeon with AMX, its
# AMX matmul then traps with an invalid opcode where the virtual machine does not let
# the tiles be used although the CPU flags list them (seen on 2-core cloud VMs); the
# baseline is built without AMX (our kernels use none either). A CMAKE_ARGS of the
# caller's own replaces this.
NO_AMX = " ".join(
    f'-DCMAKE_{lang}_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"' for lang in ("C", "CXX")
)


def build_env(cpu: set[str] | None = None) -> dict[str, str]:
    """The environment of the wheel build: CMAKE_ARGS without AMX where the CPU has it
    (an x86 compiler accepts the flags; elsewhere nothing is added)."""
    from model.kernels import cpu_flags  # here: the child that runs llama.cpp imports no torch

    env = dict(os.environ)
    flags = cpu_flags() if cpu is None else cpu
    if "CMAKE_ARGS" not in env and any(f.startswith("amx") for f in flags):
        env["CMAKE_ARGS"] = NO_AMX
    return env


def _pip(
    pip: Sequence[str], args: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run pip; (exit status, its output). A missing program or a timeout is a failure too."""
    try:
        proc = subprocess.run(
            [*pip, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except FileNotFoundError as exc:
        return 127, str(exc)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout + proc.stderr


def ensure_installed(
    cache: Path | None = None,
    pip: Sequence[str] = (sys.executable, "-m", "pip"),
    probe: Callable[[], str | None] = installed_version,
    timeout: float = BUILD_TIMEOUT_S,
) -> Install:
    """Make ``llama_cpp`` importable: as it is, from the cached wheel, or by building the
    wheel from the source distribution once. Never raises: a failure says why."""
    version = probe()
    if version is not None:
        return Install(True, "installed", version)
    cache = cache or wheel_cache()
    wheel = cached_wheel(cache) if cache.is_dir() else None
    how, build_s = "cached wheel", None
    if wheel is None:
        how = "built"
        log.info("building %s from its source distribution into %s (once)", PACKAGE, cache)
        cache.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        # --no-cache-dir: a wheel pip built before (with other CMAKE_ARGS) is not reused
        args = ["wheel", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE, PACKAGE]
        args += ["-w", str(cache)]
        rc, output = _pip(pip, args, timeout, env=build_env())
        build_s = round(time.perf_counter() - start, 1)
        (cache / "build.log").write_text(output, encoding="utf-8")
        if rc != 0:
            return Install(False, "failed", build_s=build_s, reason=_why("wheel", rc, output))
        wheel = cached_wheel(cache)
        if wheel is None:
            return Install(False, "failed", build_s=build_s, reason="the build wrote no wheel")
    # --no-deps: its dependencies (numpy, jinja2, ...) are the project's own, except diskcache,
    # which it imports at start-up and which is pure Python.
    steps = [["install", "--no-deps", str(wheel)]]
    if importlib.util.find_spec("diskcache") is None:
        steps.append(["install", "diskcache"])
    for args in steps:
        rc, output = _pip(pip, args, timeout=600)
        if rc != 0:
            reason = _why(" ".join(args[:2]), rc, output)
            return Install(False, "failed", wheel=str(wheel), build_s=build_s, reason=reason)
    version = probe()
    if version is None:
        reason = f"installed {wheel.name}, but llama_cpp still does not import"
        return Install(False, "failed", wheel=str(wheel), build_s=build_s, reason=reason)
    return Install(True, how, version, str(wheel), build_s)


def _why(step: str, rc: int, output: str) -> str:
    return f"pip {step} of {PACKAGE} failed (exit {rc}):\n{_tail(output)}"


# -- measurement (in the child process) ---------------------------------------------------


@dataclass
class Run:
    """One greedy generation: prompt evaluation to the first token, then the decode."""

    prompt_tokens: int
    new_tokens: int
    prompt_ms: float  # call to first token: prompt evaluation plus one sampling
    decode_tps: float  # tokens after the first / time after the first
    output_tps: float  # all new tokens / whole call, the load generator's definition

    @classmethod
    def from_times(cls, prompt_tokens: int, start: float, token_times: Sequence[float]) -> Run:
        """From the call's start and the time each token arrived (perf_counter seconds)."""
        n = len(token_times)
        if n < 2:
            raise ValueError(f"need at least two tokens to time a decode, got {n}")
        decode = token_times[-1] - token_times[0]
        return cls(
            prompt_tokens,
            n,
            prompt_ms=1000.0 * (token_times[0] - start),
            decode_tps=(n - 1) / decode if decode > 0 else float("inf"),
            output_tps=n / (token_times[-1] - start),
        )


def parse_prompt_ids(text: str) -> list[list[int]]:
    """``"1,2,3;4,5"`` -> ``[[1, 2, 3], [4, 5]]`` (how the suite passes prompts)."""
    prompts = [[int(x) for x in part.split(",") if x.strip()] for part in text.split(";")]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError("no prompt ids given")
    return prompts


def format_prompt_ids(prompts: Sequence[Sequence[int]]) -> str:
    return ";".join(",".join(str(t) for t in p) for p in prompts)


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    """The child's JSON: one list per figure (the suite takes medians), one entry per run."""
    return {
        "prompt_tokens": [r.prompt_tokens for r in runs],
        "new_tokens": [r.new_tokens for r in runs],
        "prompt_ms": [r.prompt_ms for r in runs],
        "decode_tps": [r.decode_tps for r in runs],
        "output_tps": [r.output_tps for r in runs],
    }


def generate_timed(llm: Any, ids: Sequence[int], new_tokens: int) -> tuple[Run, list[int]]:
    """Greedy ``new_tokens`` tokens from ``ids`` in a fresh context (no reused prefix)."""
    llm.reset()  # the next generate() must not reuse the previous prompt's KV entries
    tokens: list[int] = []
    times: list[float] = []
    start = time.perf_counter()
    # generate() yields until the caller stops: the end-of-sequence token does not end it.
    for token in llm.generate(list(ids), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            break
    return Run.from_times(len(ids), start, times), tokens


def measure(
    model_path: str, prompts: Sequence[Sequence[int]], new_tokens: int, threads: int
) -> dict[str, Any]:
    import llama_cpp

    n_ctx = max(len(p) for p in prompts) + new_tokens + 16
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=model_path,
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    runs, first_tokens = [], []
    for i, ids in enumerate(prompts):
        run, tokens = generate_timed(llm, ids, new_tokens)
        if i == 0:
            continue  # warm-up: first-touch of the weights and buffers
        runs.append(run)
        first_tokens.append(tokens[:16])
    return {
        **summarize(runs),
        "version": getattr(llama_cpp, "__version__", "unknown"),
        "system_info": _system_info(llama_cpp),
        "threads": threads,
        "n_ctx": n_ctx,
        "load_s": load_s,
        "first_tokens": first_tokens,  # the first 16 greedy tokens of each run
    }


def _system_info(llama_cpp: Any) -> str:
    """llama.cpp's own line of the CPU features it was built for and uses."""
    try:
        info = llama_cpp.llama_print_system_info()
    except AttributeError:
        return ""
    return info.decode() if isinstance(info, bytes) else str(info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", required=True, help="the GGUF file")
    parser.add_argument("--prompt-ids", required=True, help='"1,2,3;4,5,6": first is a warm-up')
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    prompts = parse_prompt_ids(args.prompt_ids)
    if len(prompts) < 2:
        parser.error("give a warm-up prompt and at least one measured prompt")
    json.dump(measure(args.model_path, prompts, args.new_tokens, args.threads), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
