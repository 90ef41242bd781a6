"""CPU kernels for matrix products on quantized weights, built from ``qmatmul.c``.

The C source is compiled once per machine with the system C compiler into a
shared library (``python -m model.kernels`` does it at install; the first use
does it otherwise) and called through ctypes. Two builds exist: ``avx2``
(AVX2 + FMA, for x86-64 CPUs of the last decade, AVX-512 ones included) and
``generic`` (plain C, any CPU). The best one the CPU supports is used;
``GPTSERVE_KERNELS`` forces one (``avx2``, ``generic``) or turns them off
(``off``), in which case quantized layers dequantize and call PyTorch.

Libraries are cached under ``GPTSERVE_KERNEL_DIR``, else ``_build`` beside this
file when it is writable, else ``~/.cache/gptserve/kernels``; the file name
carries a hash of the source and flags, so an edit rebuilds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qmatmul.c")
_COMMON_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp")
_ISA_FLAGS = {
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "generic": (),
}
_CPU_FLAGS_NEEDED = {"avx2": {"avx2", "fma", "f16c"}, "generic": set()}


class KernelBuildError(RuntimeError):
    """The C compiler is missing or failed."""


@dataclass(frozen=True)
class Kernels:
    """The loaded library: ``isa`` names the build, ``lib`` the ctypes handle."""

    isa: str
    lib: ctypes.CDLL
    path: Path


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def best_isa(flags: set[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    return "avx2" if _CPU_FLAGS_NEEDED["avx2"] <= flags else "generic"


def _cache_dirs() -> list[Path]:
    dirs = []
    if env := os.environ.get("GPTSERVE_KERNEL_DIR"):
        dirs.append(Path(env))
    dirs.append(Path(__file__).with_name("_build"))
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptserve")
    return dirs


def _lib_name(isa: str) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(_COMMON_FLAGS + _ISA_FLAGS[isa]).encode())
    return f"qmatmul-{isa}-{digest.hexdigest()[:12]}.so"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(isa: str, out_dir: Path) -> Path:
    """Compile the library for ``isa`` into ``out_dir`` (atomically) and return its path."""
    cc = compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found (install gcc, or set CC)")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / _lib_name(isa)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_out = Path(tmp) / target.name
        cmd = [cc, *_COMMON_FLAGS, *_ISA_FLAGS[isa], str(SOURCE), "-o", str(tmp_out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp_out, target)
    return target


def find_or_build(isa: str) -> Path:
    """A built library for ``isa``: an existing one from a cache dir, else a new build
    in the first cache dir that accepts it."""
    name = _lib_name(isa)
    dirs = _cache_dirs()
    for d in dirs:
        if (d / name).is_file():
            return d / name
    errors = []
    for d in dirs:
        try:
            return build(isa, d)
        except OSError as e:  # not writable: try the next one
            errors.append(f"{d}: {e}")
    raise KernelBuildError("no writable directory for the kernel library: " + "; ".join(errors))


def _bind(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int64
    for name in ("qmm_q4", "qmm_q8"):
        fn = getattr(lib, name)
        fn.argtypes = [p, i, i, p, p, p, i, p, p]
        fn.restype = None
    for name in ("qmm_dequant_q4", "qmm_dequant_q8"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, i, i, p]
        fn.restype = None


@functools.cache
def load() -> Kernels | None:
    """The kernels for this CPU, or None (logged once) when they cannot be had."""
    wanted = os.environ.get("GPTSERVE_KERNELS", "auto").strip().lower()
    if wanted == "off":
        logger.info("quantized CPU kernels off (GPTSERVE_KERNELS=off): layers dequantize")
        return None
    isa = best_isa() if wanted in ("", "auto") else wanted
    if isa not in _ISA_FLAGS:
        logger.warning("GPTSERVE_KERNELS=%r is not one of auto, off, %s", wanted, list(_ISA_FLAGS))
        isa = best_isa()
    torch.ones(1).sum()  # torch's OpenMP runtime first, so the library shares it
    try:
        path = find_or_build(isa)
        lib = ctypes.CDLL(str(path))
        _bind(lib)
    except (KernelBuildError, OSError) as e:
        logger.warning("quantized CPU kernels unavailable, layers dequantize instead: %s", e)
        return None
    logger.info("quantized CPU kernels: %s build (%s)", isa, path.name)
    return Kernels(isa, lib, path)
