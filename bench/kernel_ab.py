"""The quantized matmul of two versions of the kernel source, side by side.

``python -m bench.kernel_ab --base REV`` compiles ``model/kernels/qmatmul.c`` as it is
at git revision REV and as it is in the working tree, with the server's flags for one
build (``--isa``, default the best this CPU runs), and times ``qmm_q4``/``qmm_q8`` of
both on the default model's layer shapes (random blocks) at several row counts. The two
run interleaved, in random order each round, so that a shared machine's drift falls on
both; the table gives median microseconds, their ratio and the largest difference
between the two outputs (0: bit-identical).
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import model.kernels as mk
from bench.environment import header
from bench.kernels import SHAPES
from model.quant import QuantizedWeight

ROWS = (1, 4, 8, 16, 64)


def build(source: Path, isa: str, out: Path) -> ctypes.CDLL:
    """One version's library, bound for qmm_q4 and qmm_q8 only (older sources may lack
    the other entry points)."""
    cc = mk.compiler()
    if cc is None:
        raise RuntimeError("no C compiler")
    flags = [*mk._COMMON_FLAGS, *mk._ISA_FLAGS[isa]]
    subprocess.run([cc, *flags, str(source), "-o", str(out)], check=True)
    torch.ones(1).sum()  # torch's OpenMP runtime first, as model.kernels.load does
    lib = ctypes.CDLL(str(out))
    p, i, c = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("qmm_q4", "qmm_q8"):
        fn = getattr(lib, name)
        fn.argtypes = [p, i, i, p, p, p, i, p, c, c]
        fn.restype = c
    return lib


def source_at(rev: str, out: Path) -> Path:
    """qmatmul.c as it is at git revision ``rev``."""
    text = subprocess.run(
        ["git", "show", f"{rev}:model/kernels/qmatmul.c"], check=True, capture_output=True
    ).stdout
    out.write_bytes(text)
    return out


def _weight(n: int, k: int, kind: str, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    nb = k // 32
    if kind == "q4":
        qs = torch.randint(0, 256, (n, nb * 16), dtype=torch.uint8, generator=g)
        m: torch.Tensor | None = (torch.rand(n, nb, generator=g) - 0.5) * 0.1
    else:
        qs = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        m = None
    return QuantizedWeight(kind, qs, torch.rand(n, nb, generator=g) * 0.02, m)  # type: ignore[arg-type]


def _call(lib: ctypes.CDLL, x: torch.Tensor, w: QuantizedWeight, out: torch.Tensor) -> None:
    fn = lib.qmm_q4 if w.kind == "q4" else lib.qmm_q8
    status = fn(
        x.data_ptr(), x.shape[0], x.shape[1], w.qs.data_ptr(), w.d.data_ptr(), mk._ptr(w.m),
        w.d.shape[0], out.data_ptr(), 0, mk._f16(w),
    )  # fmt: skip
    if status:
        raise MemoryError("qmm: out of memory")


def compare(
    base: ctypes.CDLL, new: ctypes.CDLL, rows: tuple[int, ...] = ROWS, rounds: int = 7
) -> list[dict[str, Any]]:
    """Median microseconds per call of both libraries, per layer shape and row count."""
    results = []
    for n, k in SHAPES:
        w = _weight(n, k, "q8" if n > 10_000 else "q4", seed=n + k)
        reps = 3 if n > 10_000 else 20
        for m in rows:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            outs = {"base": torch.empty(m, n), "new": torch.empty(m, n)}
            libs = {"base": base, "new": new}
            times: dict[str, list[float]] = {"base": [], "new": []}
            for _ in range(rounds):
                for name in random.sample(list(libs), 2):
                    start = time.perf_counter()
                    for _ in range(reps):
                        _call(libs[name], x, w, outs[name])
                    times[name].append((time.perf_counter() - start) / reps * 1e6)
            b, a = statistics.median(times["base"]), statistics.median(times["new"])
            results.append(
                {
                    "layer": f"{w.kind} {n}x{k}",
                    "rows": m,
                    "base_us": b,
                    "new_us": a,
                    "ratio": b / a,
                    "max_diff": float((outs["base"] - outs["new"]).abs().max()),
                }
            )
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| layer (out x in) | rows | base (us) | new (us) | base / new | max difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['layer']} | {r['rows']} | {r['base_us']:.0f} | {r['new_us']:.0f} "
            f"| {r['ratio']:.2f}x | {r['max_diff']:.2g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="HEAD", help="git revision of the base source")
    parser.add_argument("--isa", default=None, help="kernel build (default: the best one)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    isa = args.isa or mk.best_isa()
    if isa not in mk.runnable_isas():
        parser.error(f"this CPU cannot run the {isa} build")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base = build(source_at(args.base, out / "base.c"), isa, out / "base.so")
        new = build(mk.SOURCE, isa, out / "new.so")
        rows = tuple(int(r) for r in args.rows.split(","))
        results = compare(base, new, rows, args.rounds)
    h = header(["python", "-m", "bench.kernel_ab", *(sys.argv[1:] if argv is None else argv)])
    m = h["machine"]
    sys.stdout.write(
        f"{h['command']}\n{m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores; "
        f"{h['date']}, commit {h['commit']}\n"
        f"kernel build {isa}: base {args.base} vs the working tree\n\n"
    )
    sys.stdout.write(table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
