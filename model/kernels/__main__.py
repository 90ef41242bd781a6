"""``python -m model.kernels [--all]``: build the kernel libraries at install time.

Without ``--all`` it builds what this CPU runs; ``--all`` builds every variant the
machine's architecture can compile (for an image built on one host and run on
another). A failed build is reported, not fatal: the model then falls back to
PyTorch matmuls with a log line.
"""

from __future__ import annotations

import platform
import sys

from model.kernels import KernelBuildError, find_or_build, runnable_isas


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if "--all" in argv:
        isas = ["avx512", "avx2", "generic"] if x86 else ["generic"]
    else:
        isas = runnable_isas()
    for isa in isas:
        try:
            sys.stdout.write(f"kernels ({isa}): {find_or_build(isa)}\n")
        except KernelBuildError as e:
            sys.stderr.write(f"kernels ({isa}) not built; quantized layers will dequantize: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
