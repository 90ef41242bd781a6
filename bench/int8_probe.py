"""Would int8 activations pay on this CPU? A probe of the opt-in mode, not a server path.

``python -m bench.int8_probe [--reps N] [--rows 1,4,16,64] [--isa avx2|avx512]`` compiles
``bench/int8_probe.c`` (which includes the server's ``model/kernels/qmatmul.c``) with
the flags the server uses for that build (``avx512`` adds AVX-512 VNNI, whose
``vpdpbusd`` replaces AVX2's ``maddubs``/``madd`` pair), then times, interleaved, one layer of each of the
default model's shapes: the server's float32-activation kernel (``qmm_q4`` /
``qmm_q8``, whichever path it takes at that many rows) against the same product with
x quantized to int8 blocks first (llama.cpp's scheme: u8 x s8 integer dot products,
one float scale per block). It prints a markdown table of medians, the speed-up and
both results' relative error against float64 dequantize-then-matmul.
"""

from __future__ import annotations

import argparse
import ctypes
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
from model.kernels import cpu_flags
from model.quant import QuantizedWeight, quantize

SOURCE = Path(__file__).with_name("int8_probe.c")
SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]


# what each build of the probe adds to the server's flags for that ISA
VNNI_FLAGS = {"avx2": (), "avx512": ("-mavx512vnni",)}
CPU_NEEDS = {
    "avx2": mk._CPU_FLAGS_NEEDED["avx2"],
    "avx512": mk._CPU_FLAGS_NEEDED["avx512"] | {"avx512_vnni"},
}


def build(out_dir: Path, isa: str = "avx2") -> ctypes.CDLL:
    """``avx2``: maddubs dot products beside the avx2 float kernels; ``avx512``: VNNI's
    vpdpbusd beside the avx512 float kernels (needs AVX-512 VNNI)."""
    cc = mk.compiler()
    if cc is None:
        raise RuntimeError("no C compiler")
    so = out_dir / f"int8_probe_{isa}.so"
    flags = [*mk._COMMON_FLAGS, *mk._ISA_FLAGS[isa], *VNNI_FLAGS[isa]]
    subprocess.run([cc, *flags, str(SOURCE), "-o", str(so)], check=True)
    torch.ones(1).sum()  # torch's OpenMP runtime first, as model.kernels.load does
    lib = ctypes.CDLL(str(so))
    mk._bind(lib)
    p, i, c = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("probe_q4_i8", "probe_q8_i8"):
        fn = getattr(lib, name)
        fn.argtypes = [p, i, i, p, p, p, i, p, c]
        fn.restype = c
    return lib


def _call(fn: Any, x: torch.Tensor, w: QuantizedWeight, out: torch.Tensor, *tail: int) -> None:
    n = w.d.shape[0]
    status = fn(
        x.data_ptr(), x.shape[0], x.shape[1], w.qs.data_ptr(), w.d.data_ptr(), mk._ptr(w.m), n,
        out.data_ptr(), *tail, mk._f16(w),
    )  # fmt: skip
    if status:
        raise MemoryError("probe: out of memory")


def measure(lib: ctypes.CDLL, rows_list: list[int], reps: int) -> list[dict[str, Any]]:
    results = []
    torch.manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.05
        for kind in ("q4", "q8") if n == 49152 else ("q4",):
            qw = quantize(w, kind)
            exact = lib.qmm_q4 if kind == "q4" else lib.qmm_q8
            probe = lib.probe_q4_i8 if kind == "q4" else lib.probe_q8_i8
            ref_w = qw.dequantize().double()
            for rows in rows_list:
                x = torch.randn(rows, k)
                a, b = torch.empty(rows, n), torch.empty(rows, n)
                _call(exact, x, qw, a, 0)
                _call(probe, x, qw, b)
                ta, tb = [], []
                for _ in range(reps):
                    t = time.perf_counter()
                    _call(exact, x, qw, a, 0)
                    ta.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    _call(probe, x, qw, b)
                    tb.append(time.perf_counter() - t)
                ref = x.double() @ ref_w.T
                results.append(
                    {
                        "layer": f"{kind} {n}x{k}",
                        "rows": rows,
                        "float32_us": statistics.median(ta) * 1e6,
                        "int8_us": statistics.median(tb) * 1e6,
                        "float32_rel_err": float((a.double() - ref).norm() / ref.norm()),
                        "int8_rel_err": float((b.double() - ref).norm() / ref.norm()),
                    }
                )
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| layer (out x in) | rows | float32 activations (us) | int8 activations (us) "
        "| speed-up | rel. error float32 | rel. error int8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f, i = r["float32_us"], r["int8_us"]
        lines.append(
            f"| {r['layer']} | {r['rows']} | {f:.0f} | {i:.0f} | {f / i:.2f}x "
            f"| {r['float32_rel_err']:.1e} | {r['int8_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--rows", default="1,4,16,64")
    p.add_argument("--isa", choices=sorted(VNNI_FLAGS), default="avx2")
    args = p.parse_args(argv)
    if not CPU_NEEDS[args.isa] <= cpu_flags():
        need = ", ".join(sorted(CPU_NEEDS[args.isa]))
        sys.stderr.write(f"the {args.isa} probe needs {need}\n")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp), args.isa)
        results = measure(lib, [int(r) for r in args.rows.split(",")], args.reps)
    env = header(["python", "-m", "bench.int8_probe", *sys.argv[1:]])
    m = env["machine"]
    where = f"{m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores"
    sys.stdout.write(f"{where}, {env['date']}, commit {env['commit']}\n\n")
    sys.stdout.write(table(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
