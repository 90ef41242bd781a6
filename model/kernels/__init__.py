"""CPU kernels for matrix products on quantized weights, built from ``qmatmul.c``.

The C source is compiled once per machine with the system C compiler into a
shared library (``python -m model.kernels`` does it at install; the first use
does it otherwise) and called through ctypes. Three builds exist: ``avx512``
(the AVX2 build with 16-lane matmul kernels, for CPUs with AVX-512 F, BW and VL),
``avx2`` (AVX2 + FMA, for x86-64 CPUs of the last decade) and ``generic`` (plain C,
any CPU). The best one the CPU supports is used; ``GPTSERVE_KERNELS`` forces one
(``avx512``, ``avx2``, ``generic``) or turns them off
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
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from model.quant import QuantizedWeight

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qmatmul.c")
_COMMON_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp")
_ISA_FLAGS = {
    "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "generic": (),
}
# Best first: best_isa() picks the first whose flags the CPU has.
_CPU_FLAGS_NEEDED = {
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"},
    "avx2": {"avx2", "fma", "f16c"},
    "generic": set(),
}


class KernelBuildError(RuntimeError):
    """The C compiler is missing or failed."""


KV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_GROUP = 64  # query heads per KV head the attention kernel handles
MAX_HEAD_DIM = 1024  # head_dim the RoPE kernel handles


@dataclass(frozen=True)
class Kernels:
    """The loaded library: ``isa`` names the build, ``lib`` the ctypes handle."""

    isa: str
    lib: ctypes.CDLL
    path: Path

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Attention of one query token per sequence over its paged context.

        q: (B, H, hd) float32 whose rows may be strided (a view into the qkv rows);
        k_cache, v_cache: (num_blocks, block_size, KV, hd) of one layer; tables: (B, W)
        int64; context_lens: (B,) int64. Returns (B, H, hd). Callers check
        ``supports_attention`` first.
        """
        b, h, hd = q.shape
        if q.stride(2) != 1 or q.stride(1) != hd:
            q = q.contiguous()
        _, block_size, kv, _ = k_cache.shape
        out = torch.empty(b, h, hd)
        self.lib.qmm_decode_attention(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
            KV_DTYPES[k_cache.dtype], block_size, b, h, kv, hd, tables.data_ptr(),
            tables.shape[1], context_lens.data_ptr(), scale, out.data_ptr(),
        )  # fmt: skip
        return out

    def matmul(
        self, x: torch.Tensor, w: QuantizedWeight, out: torch.Tensor, accumulate: bool
    ) -> None:
        """out (M, N) = or += x (M, K) @ w^T; x contiguous float32 on the CPU."""
        m, k = x.shape
        n = w.d.shape[0]
        fn = self.lib.qmm_q4 if w.kind == "q4" else self.lib.qmm_q8
        status = fn(
            x.data_ptr(), m, k, w.qs.data_ptr(), w.d.data_ptr(), _ptr(w.m), n,
            out.data_ptr(), int(accumulate), _f16(w),
        )  # fmt: skip
        if status:
            raise MemoryError("quantized matmul: out of memory")

    def dequantize(self, w: QuantizedWeight, out: torch.Tensor) -> None:
        n, nb = w.d.shape
        fn = self.lib.qmm_dequant_q4 if w.kind == "q4" else self.lib.qmm_dequant_q8
        fn(w.qs.data_ptr(), w.d.data_ptr(), _ptr(w.m), n, nb * 32, out.data_ptr(), _f16(w))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        self.lib.qmm_rms_norm(
            x.data_ptr(), weight.data_ptr(), x.shape[0], x.shape[1], eps, out.data_ptr()
        )
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of (T, 2I) rows holding gate then up: (T, I)."""
        t, two_i = gate_up.shape
        out = torch.empty(t, two_i // 2)
        self.lib.qmm_silu_mul(gate_up.data_ptr(), t, two_i // 2, out.data_ptr())
        return out

    def rope_store(
        self,
        qkv: torch.Tensor,
        n_head: int,
        n_kv_head: int,
        head_dim: int,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """RoPE on the q and k heads of contiguous (T, (H + 2 KV) hd) ``qkv`` rows, in place;
        then k and v stored in one layer's cache, ``cache`` = (slots, k_cache, v_cache)."""
        cos, sin = rope if rope is not None else (None, None)
        slots, k_cache, v_cache = cache if cache is not None else (None, None, None)
        kv_dtype = KV_DTYPES[k_cache.dtype] if k_cache is not None else 0
        self.lib.qmm_rope_store(
            qkv.data_ptr(), qkv.shape[0], n_head, n_kv_head, head_dim, positions.data_ptr(),
            _ptr(cos), _ptr(sin), _ptr(slots), _ptr(k_cache), _ptr(v_cache), kv_dtype,
        )  # fmt: skip

    def apply_token_mask(self, logits: torch.Tensor, rows: list[int], bitmask: Any) -> None:
        """-inf in place for the tokens whose bit is clear: row ``rows[i]`` of ``logits``
        (N, V) contiguous float32 against row i of ``bitmask``, a C-contiguous int32 numpy
        array of (len(rows), words) with bit j % 32 of word j // 32 for token j."""
        if logits.dtype != torch.float32 or not logits.is_contiguous():
            raise ValueError("token masks apply in place to contiguous float32 logits")
        if any(not 0 <= r < logits.shape[0] for r in rows) or bitmask.shape[0] != len(rows):
            raise ValueError("token mask rows do not match the logits")
        words = bitmask.shape[1]
        width = min(logits.shape[1], words * 32)
        index = (ctypes.c_int64 * len(rows))(*rows)
        self.lib.qmm_apply_token_mask(
            logits.data_ptr(), logits.shape[1], index, len(rows), bitmask.ctypes.data, words, width
        )

    def decode_step(self, plan: DecodePlan, ids: torch.Tensor, step: DecodeTensors) -> torch.Tensor:
        """A whole decode step of B sequences from their token ids (B,) int64: the logits
        (B, vocab), or the final normalised hidden states (B, C) when the plan has no
        output layer. Needs ``plan.embed`` and ``plan.final_norm``."""
        if plan.embed is None or plan.final_norm is None:
            raise ValueError("this decode plan has no embedding or final norm")
        b, c = ids.shape[0], plan.embed.k
        x = torch.empty(b, c)  # the residual stream, embedded by the kernel
        out = torch.empty(b, plan.head.n if plan.head is not None else c)
        head = ctypes.byref(plan.head) if plan.head is not None else None
        args, _scratch = _layer_args(plan, x, step)
        status = self.lib.qmm_decode_step(
            ctypes.byref(plan.embed), ids.data_ptr(), plan.final_norm.data_ptr(), head,
            out.data_ptr(), *args,
        )  # fmt: skip
        if status == -2:
            raise IndexError(f"a token id is outside the embedding of {plan.embed.n} rows")
        if status:
            raise MemoryError("decode step: out of memory")
        return out

    def decode_layers(self, plan: DecodePlan, x: torch.Tensor, step: DecodeTensors) -> None:
        """Run every block of a decode step on the residual stream ``x`` (B, C) in place."""
        args, _scratch = _layer_args(plan, x, step)
        status = self.lib.qmm_decode_layers(*args)
        if status:
            raise MemoryError("decode step: out of memory")


@dataclass(frozen=True)
class DecodeTensors:
    """What a decode step reads besides the weights and the residual stream."""

    positions: torch.Tensor  # (B,) int64
    rope: tuple[torch.Tensor, torch.Tensor]  # the cos and signed sin tables
    slots: torch.Tensor  # (B,) int64: where each new key and value is stored
    k_cache: torch.Tensor  # the whole cache: (n_layer, num_blocks, block_size, KV, hd)
    v_cache: torch.Tensor
    tables: torch.Tensor  # (B, W) int64 block tables
    context_lens: torch.Tensor  # (B,) int64


def _layer_args(
    plan: DecodePlan, x: torch.Tensor, step: DecodeTensors
) -> tuple[tuple[Any, ...], torch.Tensor]:
    """The arguments of ``qmm_decode_layers`` (which ``qmm_decode_step`` ends with), for
    the residual stream ``x`` (B, C), and the scratch buffer they point into (the caller
    holds it until the call returns)."""
    b, c = x.shape
    width = (plan.n_head + 2 * plan.n_kv_head) * plan.head_dim
    scratch = torch.empty(b * (c + width + plan.n_head * plan.head_dim + 3 * plan.inner))
    k_cache, tables = step.k_cache, step.tables
    args = (
        plan.layers, plan.n_layer, x.data_ptr(), b, c, plan.n_head, plan.n_kv_head,
        plan.head_dim, plan.inner, plan.eps, step.positions.data_ptr(), step.rope[0].data_ptr(),
        step.rope[1].data_ptr(), step.slots.data_ptr(), k_cache.data_ptr(),
        step.v_cache.data_ptr(), k_cache[0].numel(), KV_DTYPES[k_cache.dtype], k_cache.shape[2],
        tables.data_ptr(), tables.shape[1], step.context_lens.data_ptr(), plan.scale,
        scratch.data_ptr(),
    )  # fmt: skip
    return args, scratch


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f16(w: QuantizedWeight) -> int:
    """1 when the weight's scales are float16 (else float32)."""
    return int(w.d.dtype == torch.float16)


class QWeightC(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("kind", ctypes.c_int32),
        ("f16", ctypes.c_int32),
    ]


class QLayerC(ctypes.Structure):
    _fields_ = [
        ("qkv", QWeightC),
        ("o", QWeightC),
        ("fc", QWeightC),
        ("down", QWeightC),
        ("attn_norm", ctypes.c_void_p),
        ("mlp_norm", ctypes.c_void_p),
    ]


@dataclass
class DecodePlan:
    """The weights of every block as the C decode step reads them (built once)."""

    layers: Any  # ctypes array of QLayerC
    keep: list[torch.Tensor]  # the tensors the pointers point into, kept alive
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    inner: int
    eps: float
    scale: float
    # The rest of a step around the blocks, each run in C when present: the embedding
    # table (quantized), the final RMSNorm's weight, the output layer (quantized).
    embed: QWeightC | None = None
    final_norm: torch.Tensor | None = None
    head: QWeightC | None = None


def qweight_struct(w: QuantizedWeight) -> QWeightC:
    n, nb = w.d.shape
    return QWeightC(
        w.qs.data_ptr(), w.d.data_ptr(), _ptr(w.m), n, nb * 32, 0 if w.kind == "q4" else 1, _f16(w)
    )


def supports_cache(k_cache: torch.Tensor) -> bool:
    """A cache the kernels read and write: on the CPU, contiguous, in a dtype they know."""
    return k_cache.device.type == "cpu" and k_cache.dtype in KV_DTYPES and k_cache.is_contiguous()


def supports_attention(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether ``Kernels.decode_attention`` takes these: CPU, float32 queries, a
    contiguous cache in a dtype it reads, at most ``MAX_GROUP`` heads per KV head."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k_cache.dtype in KV_DTYPES
        and k_cache.is_contiguous()
        and q.shape[1] // k_cache.shape[2] <= MAX_GROUP
    )


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
    return runnable_isas(flags)[0]


def runnable_isas(flags: set[str] | None = None) -> list[str]:
    """Every build this CPU can run, best first."""
    flags = cpu_flags() if flags is None else flags
    return [isa for isa, needed in _CPU_FLAGS_NEEDED.items() if needed <= flags]


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
    c_int, c_float = ctypes.c_int, ctypes.c_float
    for name in ("qmm_q4", "qmm_q8"):
        fn = getattr(lib, name)
        fn.argtypes = [p, i, i, p, p, p, i, p, c_int, c_int]
        fn.restype = ctypes.c_int
    lib.qmm_force_path.argtypes = [c_int]
    lib.qmm_force_path.restype = c_int
    for name in ("qmm_dequant_q4", "qmm_dequant_q8"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, i, i, p, c_int]
        fn.restype = None
    q = ctypes.POINTER(QWeightC)
    layer_args: list[Any] = [ctypes.POINTER(QLayerC), i, p, i, i, i, i, i, i, c_float]
    layer_args += [p, p, p, p, p, p, i, c_int, i, p, i, p, c_float, p]
    signatures: dict[str, list[Any]] = {
        "qmm_decode_step": [q, p, p, q, p, *layer_args],
        "qmm_decode_layers": layer_args,
        "qmm_decode_attention": [p, i, p, p, c_int, i, i, i, i, i, p, i, p, c_float, p],
        "qmm_rms_norm": [p, p, i, i, c_float, p],
        "qmm_apply_token_mask": [p, i, p, i, p, i, i],
        "qmm_silu_mul": [p, i, i, p],
        "qmm_rope_store": [p, i, i, i, i, p, p, p, p, p, p, c_int],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int if name.startswith("qmm_decode_") else None


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
    elif isa not in runnable_isas():
        logger.warning("GPTSERVE_KERNELS=%s: this CPU lacks its instructions", isa)
        isa = best_isa()
    try:
        kernels = load_build(isa)
    except (KernelBuildError, OSError) as e:
        logger.warning("quantized CPU kernels unavailable, layers dequantize instead: %s", e)
        return None
    logger.info("quantized CPU kernels: %s build (%s)", isa, kernels.path.name)
    return kernels


def load_build(isa: str) -> Kernels:
    """The library of one build, compiled if need be, whatever ``GPTSERVE_KERNELS``
    says (for tests and benchmarks that compare builds; the CPU must run it).
    Raises KernelBuildError or OSError."""
    torch.ones(1).sum()  # torch's OpenMP runtime first, so the library shares it
    path = find_or_build(isa)
    lib = ctypes.CDLL(str(path))
    _bind(lib)
    return Kernels(isa, lib, path)
