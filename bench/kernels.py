"""Matmul kernels for quantized weights, side by side on this CPU.

``python -m bench.kernels [--reps N] [--json PATH]`` times one linear layer of the
default model's shapes with every candidate, interleaved (each round runs every
candidate once, so machine noise hits them alike), and prints a markdown table
of medians in microseconds (each round in a new random order):

- ``f32 mm``: float32 weights through ``F.linear`` (MKL's sgemm/sgemv): exact
  for dequantized weights, 4 bytes a weight;
- ``int8pack bf16`` / ``int8pack f32``: PyTorch's ``_weight_int8pack_mm``
  (per-channel int8) with bfloat16 and with float32 activations;
- ``int4pack bf16`` / ``int4pack f32``: ``_weight_int4pack_mm_for_cpu`` (groups
  of 32) likewise;
- ``ours q4 <build>`` / ``ours q8 <build>``: ``model.kernels`` on GGUF-style blocks
  with float32 activations (exact dequantization; the default path), once per vector
  build this CPU runs (``avx512`` where it has AVX-512, ``avx2``); the model uses the
  first;
- ``compile q4`` (with ``--compile``, off by default: ~30 s of compiling per layer
  shape): ``torch.compile`` (inductor's CPU backend, C++ through the system compiler)
  of the same q4 blocks' dequantize-then-``F.linear`` written in PyTorch ops, the
  fused kernel the issue suggested it might generate.

Candidates PyTorch cannot run here are reported as such, not skipped silently.

``python -m bench.kernels --steps ROUNDS`` times instead the default model's whole decode
step (batch 1 and 16, context 192) with each vector build, interleaved in one process.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.environment import header, write_json
from model.kernels import KernelBuildError, cpu_flags, load_build, runnable_isas
from model.kernels import load as load_kernels
from model.quant import QuantizedWeight, QuantLinear, quantize, unpack_q4

# (out, in) of the default model's layers: qkv, fc (gate+up), down, and the output layer.
SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]
ROWS = (1, 16, 64)


def _dequant_linear(
    x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """A q4 layer in plain PyTorch ops (``QuantizedWeight.dequantize``'s fallback, then
    ``F.linear``), for ``torch.compile`` to fuse if it can."""
    w = unpack_q4(qs).float() * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)
    return F.linear(x, w.reshape(qs.shape[0], -1))


_compiled: Callable[..., torch.Tensor] | None = None


def _compiled_q4(x: torch.Tensor, q4: QuantLinear) -> Callable[[], Any] | str:
    global _compiled
    w = q4.weight_q
    if w.m is None:
        return "unavailable: q4 without minimums"
    try:
        if _compiled is None:
            _compiled = torch.compile(_dequant_linear, dynamic=True)
        fn = _compiled
        fn(x, w.qs, w.d, w.m)  # compiles (or recompiles) here, not in the timing
    except Exception as e:  # inductor needs a working C++ compiler
        return f"unavailable: {str(e).splitlines()[0][:60]}"
    return lambda: fn(x, w.qs, w.d, w.m)


def _candidates(
    w: torch.Tensor, rows: int, with_compile: bool = False
) -> dict[str, Callable[[], Any] | str]:
    n, k = w.shape
    x = torch.randn(rows, k)
    xb = x.to(torch.bfloat16)
    out: dict[str, Callable[[], Any] | str] = {"f32 mm": lambda: F.linear(x, w)}
    q8 = QuantLinear(quantize(w, "q8"))
    q4 = QuantLinear(quantize(w, "q4"))
    try:
        w8 = (w / (w.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8)
        s8 = w.abs().amax(1) / 127
        torch._weight_int8pack_mm(xb, w8, s8.to(torch.bfloat16))
        out["int8pack bf16"] = lambda: torch._weight_int8pack_mm(xb, w8, s8.to(torch.bfloat16))
        out["int8pack f32"] = lambda: torch._weight_int8pack_mm(x, w8, s8)
    except (RuntimeError, AttributeError) as e:
        out["int8pack"] = f"unavailable: {str(e).splitlines()[0][:60]}"
    try:
        wi = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(wi, 1)
        sz = torch.rand(k // 32, n, 2)
        torch._weight_int4pack_mm_for_cpu(xb, packed, 32, sz.to(torch.bfloat16))
        out["int4pack bf16"] = lambda: torch._weight_int4pack_mm_for_cpu(
            xb, packed, 32, sz.to(torch.bfloat16)
        )
        out["int4pack f32"] = lambda: torch._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    except (RuntimeError, AttributeError) as e:
        out["int4pack"] = f"unavailable: {str(e).splitlines()[0][:60]}"
    if load_kernels() is None:
        out["ours"] = "unavailable: no kernels (see the log)"
    for isa in [i for i in runnable_isas() if i != "generic"]:
        # each vector build this CPU runs, called directly (the model uses the first)
        try:
            kernels = load_build(isa)
        except (KernelBuildError, OSError) as e:
            out[f"ours {isa}"] = f"unavailable: {str(e).splitlines()[0][:60]}"
            continue
        y = torch.empty(rows, n)
        for name, layer in (("q4", q4), ("q8", q8)):
            # a copy of the blocks per build: sharing them, a build would find in cache
            # the weights the one before it just read, and look faster than it is
            out[f"ours {name} {isa}"] = functools.partial(
                kernels.matmul, x, _copy(layer.weight_q), y, False
            )
    if with_compile:
        out["compile q4"] = _compiled_q4(x, q4)
    return out


def _copy(w: QuantizedWeight) -> QuantizedWeight:
    m = None if w.m is None else w.m.clone()
    return QuantizedWeight(w.kind, w.qs.clone(), w.d.clone(), m)


def measure(reps: int, with_compile: bool = False) -> list[dict[str, Any]]:
    rows_out = []
    torch.manual_seed(0)
    rng = random.Random(0)
    with torch.inference_mode():
        for n, k in SHAPES:
            w = torch.randn(n, k) * 0.05
            for rows in ROWS:
                if n == 49152 and rows == 64:
                    continue  # the output layer only sees the rows that sample
                cands = _candidates(w, rows, with_compile)
                runnable = {name: fn for name, fn in cands.items() if callable(fn)}
                times: dict[str, list[float]] = {name: [] for name in runnable}
                for fn in runnable.values():
                    fn()  # warm-up
                order = list(runnable.items())
                for _ in range(reps):
                    # a new order each round: a candidate run right after a long one
                    # (PyTorch's float32-activation int kernels) pays for waking the
                    # threads and refilling caches, and must not always be the same one
                    rng.shuffle(order)
                    for name, fn in order:
                        t = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t)
                row: dict[str, Any] = {"shape": f"{n}x{k}", "rows": rows}
                row.update({name: statistics.median(ts) * 1e6 for name, ts in times.items()})
                row.update({name: v for name, v in cands.items() if isinstance(v, str)})
                rows_out.append(row)
    return rows_out


def table(results: list[dict[str, Any]]) -> str:
    names: list[str] = []
    for r in results:
        names += [k for k in r if k not in ("shape", "rows") and k not in names]
    lines = [
        "| layer (out x in) | rows | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in results:
        cells = []
        for name in names:
            v = r.get(name, "")
            cells.append(f"{v:.0f}" if isinstance(v, float) else str(v))
        lines.append(f"| {r['shape']} | {r['rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def isa() -> str:
    flags = cpu_flags()
    return (
        "AVX-512"
        if "avx512f" in flags
        else "AVX2"
        if "avx2" in flags
        else "neither AVX2 nor AVX-512"
    )


def step_per_build(rounds: int, batches: tuple[int, ...] = (1, 16)) -> dict[str, dict[int, float]]:
    """The default model's whole decode step (context 192) with each vector build this
    CPU runs, interleaved in one process: median milliseconds per step."""
    import os

    from bench.offline import decode_step_tps
    from model import kernels as kmod
    from model.loading import load_model

    model = load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu").model
    builds = [i for i in runnable_isas() if i != "generic"]
    times: dict[str, dict[int, list[float]]] = {i: {b: [] for b in batches} for i in builds}
    wanted = os.environ.get("GPTSERVE_KERNELS")
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for build in builds:
                    os.environ["GPTSERVE_KERNELS"] = build  # what load() then returns
                    kmod.load.cache_clear()
                    for b in batches:
                        ms = 1000 * b / decode_step_tps(model, b, 192, iters=10)
                        times[build][b].append(ms)
    finally:
        if wanted is None:
            os.environ.pop("GPTSERVE_KERNELS", None)
        else:
            os.environ["GPTSERVE_KERNELS"] = wanted
        kmod.load.cache_clear()
    return {i: {b: statistics.median(v) for b, v in t.items()} for i, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--compile", action="store_true", help="add torch.compile's q4 (slow)")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: the default model's decode step with each build, ROUNDS interleaved",
    )
    args = p.parse_args(argv)
    if args.steps:
        for build, per_batch in step_per_build(args.steps).items():
            cells = ", ".join(f"batch {b}: {ms:.2f} ms" for b, ms in per_batch.items())
            print(f"{isa()}, kernel build {build}: {cells} (median of {args.steps})")
        return 0
    results = measure(args.reps, args.compile)
    kernels = load_kernels()
    info = {
        "environment": header(["python", "-m", "bench.kernels", *sys.argv[1:]]),
        "instruction_set": isa(),
        "kernel_build": kernels.isa if kernels else None,
        "threads": torch.get_num_threads(),
        "results": results,
    }
    if args.json:
        write_json(args.json, info)
    print(f"{isa()}, kernel build {info['kernel_build']}, {info['threads']} threads; "
          "median microseconds per call")  # fmt: skip
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
