"""Decode steps replayed from CUDA graphs.

A decode step launches hundreds of small kernels; replaying a captured graph
launches them in one call. Graphs are captured once, after warm-up, for every
(batch size bucket, block-table width bucket): a step is padded up to the
next bucket. Width buckets keep the attention's gather proportional to the
longest context in the batch instead of the model's maximum. Padding rows
read and write only the runner's scratch block, which no sequence owns.

Static inputs (ids, positions, slot mapping, context lengths, block tables)
live in fixed device buffers; a step fills them with one host-to-device copy.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.gpt import GPT
from model.kv_cache import ForwardBatch, KVCache

if TYPE_CHECKING:
    from service.engine.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)

MIN_WIDTH_BLOCKS = 8


def width_buckets(max_blocks: int) -> list[int]:
    """Block-table widths: powers of two from MIN_WIDTH_BLOCKS, capped by max_blocks."""
    widths = []
    w = MIN_WIDTH_BLOCKS
    while w < max_blocks:
        widths.append(w)
        w *= 2
    widths.append(max_blocks)
    return widths


class DecodeGraphs:
    def __init__(
        self,
        model: GPT,
        kv_cache: KVCache,
        batch_sizes: Sequence[int],
        max_blocks: int,
        scratch_block: int,
    ) -> None:
        if not batch_sizes:
            raise ValueError("no decode graph batch size fits max_num_seqs")
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = sorted(batch_sizes)
        self.widths = width_buckets(max_blocks)
        self.scratch = scratch_block
        self.block_size = kv_cache.block_size
        b, dev = self.sizes[-1], model.device
        # Static inputs. Row-major [ids | positions | slots | context lens] then the table.
        self.ids = torch.zeros(b, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(b, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(b, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(b, dtype=torch.int64, device=dev)
        self.rows = torch.arange(b, dtype=torch.int64, device=dev)
        self.tables = {w: torch.zeros(b, w, dtype=torch.int64, device=dev) for w in self.widths}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    # -- capture --------------------------------------------------------------------

    def _batch(self, b: int, w: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.ids[:b],
            positions=self.positions[:b],
            slot_mapping=self.slots[:b],
            block_tables=self.tables[w][:b],
            context_lens=self.context_lens[:b],
            logits_indices=self.rows[:b],
            query_lens=[1] * b,
            start_pos=[0] * b,
        )

    def _pad_inputs(self) -> None:
        """Harmless values: every row decodes token 0 at position 0 into the scratch block."""
        self.ids.zero_()
        self.positions.zero_()
        self.slots.fill_(self.scratch * self.block_size)
        self.context_lens.fill_(1)
        for table in self.tables.values():
            table.fill_(self.scratch)

    @torch.inference_mode()
    def capture(self) -> None:
        self._pad_inputs()
        pool = None
        stream = torch.cuda.Stream(self.model.device)
        # Largest first, sharing one memory pool: smaller graphs reuse its blocks.
        for w in reversed(self.widths):
            for b in reversed(self.sizes):
                batch = self._batch(b, w)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up outside the graph (allocator, kernels)
                        self.model(batch, self.kv_cache)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.model(batch, self.kv_cache)
                pool = graph.pool()
                self._graphs[(b, w)] = (graph, out)
        torch.cuda.synchronize(self.model.device)
        logger.info("captured %d decode graphs", len(self._graphs))

    # -- replay ---------------------------------------------------------------------

    def run(self, chunks: Sequence[ScheduledChunk], tables: Sequence[list[int]]) -> Tensor | None:
        """Logits (B, vocab) of a pure decode step, or None when no bucket fits."""
        n = len(chunks)
        need = max(len(t) for t in tables)
        bi, wi = bisect.bisect_left(self.sizes, n), bisect.bisect_left(self.widths, need)
        if bi == len(self.sizes) or wi == len(self.widths):
            return None
        b, w = self.sizes[bi], self.widths[wi]
        self._fill(chunks, tables, b, w)
        return self._replay(b, w)[:n]

    def _replay(self, b: int, w: int) -> Tensor:
        """Logits (b, vocab) of the filled static batch of ``b`` rows and width ``w``."""
        graph, out = self._graphs[(b, w)]
        graph.replay()
        return out

    def _fill(
        self, chunks: Sequence[ScheduledChunk], tables: Sequence[list[int]], b: int, w: int
    ) -> None:
        bs, pad = self.block_size, b - len(chunks)
        ids, pos, slots, ctx, flat = [], [], [], [], []
        for c, table in zip(chunks, tables, strict=True):
            p = c.start
            ids.append(c.seq.token_ids[p])
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            ctx.append(p + 1)
            flat.extend(table)
            flat.extend([self.scratch] * (w - len(table)))
        ids += [0] * pad
        pos += [0] * pad
        slots += [self.scratch * bs] * pad
        ctx += [1] * pad
        flat += [self.scratch] * (w * pad)
        host = torch.tensor(ids + pos + slots + ctx + flat, dtype=torch.int64)
        if self.model.device.type == "cuda":
            host = host.pin_memory()  # lets the copy run asynchronously
        dev = host.to(self.model.device, non_blocking=True)
        self.ids[:b].copy_(dev[:b])
        self.positions[:b].copy_(dev[b : 2 * b])
        self.slots[:b].copy_(dev[2 * b : 3 * b])
        self.context_lens[:b].copy_(dev[3 * b : 4 * b])
        self.tables[w][:b].copy_(dev[4 * b :].view(b, w))
