"""``python -m model.kernels``: build the kernel libraries this CPU can run, at install."""

from __future__ import annotations

import sys

from model.kernels import KernelBuildError, best_isa, find_or_build


def main() -> int:
    isas = ["generic"] if best_isa() == "generic" else ["avx2", "generic"]
    status = 0
    for isa in isas:
        try:
            sys.stdout.write(f"kernels ({isa}): {find_or_build(isa)}\n")
        except KernelBuildError as e:
            sys.stderr.write(f"kernels ({isa}) not built; quantized layers will dequantize: {e}\n")
            status = 0  # not fatal: the model falls back to PyTorch matmuls
    return status


if __name__ == "__main__":
    sys.exit(main())
