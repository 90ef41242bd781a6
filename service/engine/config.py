"""Engine settings: batch shape, KV cache size, queue bounds, CUDA graph buckets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KVCacheDtype = Literal["auto", "float32", "bfloat16", "float16"]
KV_CACHE_DTYPES: tuple[KVCacheDtype, ...] = ("auto", "float32", "bfloat16", "float16")


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

    CPU_KV_CACHE_TOKENS = 32768

    max_num_seqs: int = 64
    max_batched_tokens: int = 512  # per-step token budget (decodes + prefill chunks)
    block_size: int = 16
    kv_cache_tokens: int | None = None
    kv_cache_memory_fraction: float = 0.85
    max_queue_requests: int = 256
    max_queue_tokens: int = 1_000_000
    max_model_len: int | None = None
    kv_cache_dtype: KVCacheDtype = "auto"  # auto: the model's dtype (float32 on the CPU: exact)
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # only used on CUDA
    decode_graph_batch_sizes: tuple[int, ...] = field(default=DEFAULT_GRAPH_BATCH_SIZES)

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_batched_tokens",
            "block_size",
            "max_queue_requests",
            "max_queue_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
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
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        sizes = tuple(sorted(set(self.decode_graph_batch_sizes)))
        if not sizes or sizes[0] <= 0:
            raise ValueError(
                f"decode_graph_batch_sizes must be positive, got {self.decode_graph_batch_sizes}"
            )
        self.decode_graph_batch_sizes = sizes
