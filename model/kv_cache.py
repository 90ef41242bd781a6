"""Paged KV cache storage and the per-batch addressing the attention uses.

The cache is a pool of fixed-size blocks per layer. A sequence owns a list of
block ids (its block table); token ``p`` of a sequence lives in block
``table[p // block_size]`` at offset ``p % block_size``. Which blocks a
sequence gets is the engine's business: the model accepts any table.
"""

from __future__ import annotations

import math
import mmap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.config import ModelConfig


class KVCache(nn.Module):
    """Preallocated key/value blocks for every layer.

    Buffers are ``persistent=False``: they never land in a checkpoint.
    Shapes: ``k``/``v`` are (n_layer, num_blocks, block_size, n_kv_head, head_dim).
    """

    k: Tensor
    v: Tensor

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be positive ({num_blocks}, {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (config.n_layer, num_blocks, block_size, config.n_kv_head, config.head_dim)
        self.register_buffer("k", _zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", _zeros(shape, dtype, device), persistent=False)

    @classmethod
    def for_tokens(
        cls, config: ModelConfig, num_tokens: int, block_size: int = 16, **kw
    ) -> KVCache:
        """A cache with room for at least ``num_tokens`` tokens."""
        return cls(config, -(-num_tokens // block_size), block_size, **kw)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * config.kv_size * elem

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def write(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> None:
        """Store new keys/values (T, n_kv_head, head_dim) at flat slot indices (T,)."""
        kc = self.k[layer].view(-1, *self.k.shape[-2:])  # (num_blocks * block_size, n_kv, hd)
        vc = self.v[layer].view(-1, *self.v.shape[-2:])
        kc.index_copy_(0, slots, k.to(kc.dtype))
        vc.index_copy_(0, slots, v.to(vc.dtype))

    def gather(self, layer: int, block_tables: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values of whole blocks: (B, n_blocks * block_size, n_kv_head, head_dim)."""
        shape = (block_tables.shape[0], -1, *self.k.shape[-2:])
        # index_select on the flat table: faster than advanced indexing on the CPU
        # (docs/benchmarks.md, Analysis).
        blocks = block_tables.reshape(-1)
        k = self.k[layer].index_select(0, blocks)  # (B * n_blocks, block_size, n_kv, hd)
        v = self.v[layer].index_select(0, blocks)
        return k.view(shape), v.view(shape)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Zeros that cost no memory until written, on the CPU.

    ``torch.zeros`` writes every byte, so a cache sized for 32k tokens would be
    resident from start-up. An anonymous memory map gets zero pages from the OS,
    which only become resident when a block is first written, and in 4 KiB pages
    (numpy's large arrays ask for 2 MiB huge pages, so one written slot per layer
    would make megabytes resident).
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer's note on non-writable buffers: this one is
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


@dataclass
class ForwardBatch:
    """A ragged batch: the new tokens of several sequences, concatenated.

    Each sequence contributes ``query_lens[i]`` new tokens starting at
    position ``start_pos[i]``; after the step its cache holds
    ``context_lens[i] = start_pos[i] + query_lens[i]`` tokens. Prefill chunks
    and single-token decode steps mix freely.
    """

    input_ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    slot_mapping: Tensor | None  # (T,) int64 flat cache slot per token; None without a cache
    block_tables: Tensor | None  # (B, max_blocks) int64, padded with block 0
    context_lens: Tensor  # (B,) int64
    logits_indices: Tensor  # (N,) rows of the T tokens whose logits are returned
    query_lens: list[int]  # host copies, for splitting the batch
    start_pos: list[int]

    def cache_addressing(self) -> tuple[Tensor, Tensor]:
        """(slot_mapping, block_tables): present when the batch was built for a KV cache."""
        if self.slot_mapping is None or self.block_tables is None:
            raise ValueError("this batch was built without block tables: it cannot use a KV cache")
        return self.slot_mapping, self.block_tables

    @property
    def num_leading_decodes(self) -> int:
        """How many sequences at the front add exactly one token (the batched decode path)."""
        n = 0
        for q in self.query_lens:
            if q != 1:
                break
            n += 1
        return n

    @classmethod
    def build(
        cls,
        tokens: Sequence[Sequence[int]],
        start_pos: Sequence[int] | None = None,
        block_tables: Sequence[Sequence[int]] | None = None,
        block_size: int = 16,
        device: torch.device | str = "cpu",
        logits_rows: Sequence[Sequence[int]] | None = None,
    ) -> ForwardBatch:
        """Pack sequences. ``logits_rows[i]`` selects which of sequence i's new
        tokens get logits (offsets into its chunk); the default is its last token."""
        if not tokens or any(len(t) == 0 for t in tokens):
            raise ValueError("every sequence in a batch needs at least one token")
        starts = list(start_pos) if start_pos is not None else [0] * len(tokens)
        qlens = [len(t) for t in tokens]
        flat_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        wanted: list[int] = []
        offset = 0
        for i, (toks, start) in enumerate(zip(tokens, starts, strict=True)):
            flat_ids.extend(toks)
            pos = range(start, start + len(toks))
            positions.extend(pos)
            if block_tables is not None:
                table = block_tables[i]
                if len(table) * block_size < start + len(toks):
                    raise ValueError(
                        f"sequence {i}: block table of {len(table)} blocks cannot hold "
                        f"{start + len(toks)} tokens"
                    )
                slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
            rows = logits_rows[i] if logits_rows is not None else [len(toks) - 1]
            wanted.extend(offset + r for r in rows)
            offset += len(toks)

        def as_tensor(x: Sequence[int] | Sequence[Sequence[int]]) -> Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        tables = None
        if block_tables is not None:
            ctx_blocks = [-(-(s + q) // block_size) for s, q in zip(starts, qlens, strict=True)]
            width = max(ctx_blocks)
            tables = as_tensor(
                [
                    list(t[:n]) + [0] * (width - n)
                    for t, n in zip(block_tables, ctx_blocks, strict=True)
                ]
            )
        return cls(
            input_ids=as_tensor(flat_ids),
            positions=as_tensor(positions),
            slot_mapping=as_tensor(slots) if block_tables is not None else None,
            block_tables=tables,
            context_lens=as_tensor([s + q for s, q in zip(starts, qlens, strict=True)]),
            logits_indices=as_tensor(wanted),
            query_lens=qlens,
            start_pos=starts,
        )
