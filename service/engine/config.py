"""Engine settings: batch shape, KV cache size, queue bounds, CUDA graph buckets.

Each field an operator may set carries its description and bounds in its
metadata (``setting``); the service's ``Settings`` derives its engine section
from them, and ``__post_init__`` checks the same bounds, so a rule lives here once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CPU_KV_CACHE_TOKENS = 32768
KVCacheDtype = Literal["auto", "float32", "bfloat16", "float16"]


def setting(default: Any, description: str, **bounds: float) -> Any:
    """A field operators may set: ``bounds`` are pydantic's ``ge``, ``gt`` and ``le``."""
    return field(default=default, metadata={"description": description, **bounds})


@dataclass
class EngineConfig:
    """How the engine batches, caches and queues.

    ``kv_cache_tokens`` sizes the paged cache directly; when it is None the
    engine uses ``kv_cache_memory_fraction`` of free accelerator memory on CUDA
    and ``CPU_KV_CACHE_TOKENS`` on the CPU. ``max_model_len`` None means the
    model's own context (clamped to what the cache can hold). ``kv_cache_dtype``
    ``auto`` stores keys and values in the model's dtype; float16 or bfloat16 halve
    the cache on the CPU at the cost of exactness (docs/operations.md).
    """

    CPU_KV_CACHE_TOKENS = CPU_KV_CACHE_TOKENS

    max_num_seqs: int = setting(64, "sequences decoded together in one step", ge=1, le=4096)
    # per-step token budget (decodes + prefill chunks)
    max_batched_tokens: int = setting(512, "token budget of one engine step", ge=1, le=1_048_576)
    block_size: int = setting(16, "KV cache block size in tokens", ge=1, le=1024)
    kv_cache_tokens: int | None = setting(
        None,
        "KV cache size in tokens (default: from memory fraction on CUDA, "
        f"{CPU_KV_CACHE_TOKENS} on CPU)",
        ge=1,
        le=1 << 30,
    )
    kv_cache_memory_fraction: float = setting(
        0.85, "share of free accelerator memory the KV cache may take", gt=0.0, le=1.0
    )
    max_queue_requests: int = setting(256, "waiting requests before 429", ge=1, le=1_000_000)
    max_queue_tokens: int = setting(1_000_000, "waiting prompt tokens before 429", ge=1, le=1 << 34)
    max_model_len: int | None = setting(
        None,
        "context length (default: the model's, clamped to the KV cache)",
        ge=1,
        le=1 << 24,
    )
    kv_cache_dtype: KVCacheDtype = setting(
        "auto", "KV cache dtype (auto: the model's; float16/bfloat16 halve it, not exact)"
    )
    enable_prefix_caching: bool = setting(True, "share KV blocks of identical prompt prefixes")
    cuda_graphs: bool = setting(True, "capture the decode step in CUDA graphs (CUDA only)")
    decode_graph_batch_sizes: tuple[int, ...] = field(default=DEFAULT_GRAPH_BATCH_SIZES)
    structured_compile_timeout: float = setting(
        5.0,
        "seconds a JSON schema, regex or grammar may take to compile (400 past it)",
        gt=0.0,
        le=600.0,
    )
    structured_cache_size: int = setting(
        256, "compiled constraints kept (one per distinct schema, regex or grammar)", ge=1, le=65536
    )

    def __post_init__(self) -> None:
        for f in settings_fields():
            _check_bounds(f.name, f.type, getattr(self, f.name), f.metadata)
        # Every running sequence must be able to decode in every step.
        if self.max_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_batched_tokens ({self.max_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(
                f"kv_cache_tokens ({self.kv_cache_tokens}) must hold at least one block of {self.block_size}"
            )
        if self.kv_cache_dtype not in get_args(KVCacheDtype):
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(get_args(KVCacheDtype))}, "
                f"got {self.kv_cache_dtype!r}"
            )
        sizes = tuple(sorted(set(self.decode_graph_batch_sizes)))
        if not sizes or sizes[0] <= 0:
            raise ValueError(
                f"decode_graph_batch_sizes must be positive, got {self.decode_graph_batch_sizes}"
            )
        self.decode_graph_batch_sizes = sizes


def settings_fields() -> list[Any]:
    """The fields operators may set, in declaration order."""
    return [f for f in fields(EngineConfig) if "description" in f.metadata]


def _check_bounds(name: str, kind: Any, value: Any, bounds: Any) -> None:
    if value is None or not any(b in bounds for b in ("ge", "gt", "le")):
        return
    integer = str(kind).startswith("int")
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    ok = (
        math.isfinite(value)
        and ("ge" not in bounds or value >= bounds["ge"])
        and ("gt" not in bounds or value > bounds["gt"])
        and ("le" not in bounds or value <= bounds["le"])
    )
    if not ok:
        low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds.get('gt', '-inf')}"
        high = f"{bounds['le']}]" if "le" in bounds else "inf)"
        raise ValueError(f"{name} must be in {low}, {high}, got {value!r}")
