"""The model side of a step: the KV cache, batch packing, the forward pass.

The runner owns the paged KV cache. It turns the scheduler's chunks into one
``ForwardBatch`` and returns the logits of the chunks that sample. On CUDA,
pure decode steps are replayed from captured graphs (``cuda_graphs.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model.gpt import GPT
from model.kv_cache import ForwardBatch, KVCache
from service.engine.config import EngineConfig
from service.engine.cuda_graphs import DecodeGraphs
from service.engine.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)


def kv_cache_dtype(model: GPT, config: EngineConfig) -> torch.dtype:
    """The cache's dtype: the model's unless the config names one."""
    if config.kv_cache_dtype == "auto":
        return model.dtype
    dtype: torch.dtype = getattr(torch, config.kv_cache_dtype)
    return dtype


def kv_cache_blocks(model: GPT, config: EngineConfig) -> int:
    """How many KV blocks to allocate: from the token budget, else from free memory."""
    bs = config.block_size
    if config.kv_cache_tokens is not None:
        return -(-config.kv_cache_tokens // bs)
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        per_block = KVCache.bytes_per_token(model.config, kv_cache_dtype(model, config)) * bs
        # Leave room for activations of the largest step before taking the fraction.
        activations = 64 * config.max_batched_tokens * model.config.n_embd * 4
        return max(1, int((free - activations) * config.kv_cache_memory_fraction) // per_block)
    return -(-EngineConfig.CPU_KV_CACHE_TOKENS // bs)


class ModelRunner:
    def __init__(
        self, model: GPT, config: EngineConfig, num_blocks: int, max_model_len: int
    ) -> None:
        self.model = model
        self.block_size = config.block_size
        self.device = model.device
        # One block more than the pool: padding rows of graph-replayed decodes write there.
        self.kv_cache = KVCache(
            model.config,
            num_blocks + 1,
            config.block_size,
            dtype=kv_cache_dtype(model, config),
            device=model.device,
        )
        self.scratch_block = num_blocks
        self.graphs: DecodeGraphs | None = None
        if model.device.type == "cuda" and config.cuda_graphs:
            max_blocks = -(-max_model_len // config.block_size)
            # Capped at max_num_seqs, so that a full batch still has a graph.
            sizes = sorted({min(b, config.max_num_seqs) for b in config.decode_graph_batch_sizes})
            self.graphs = DecodeGraphs(model, self.kv_cache, sizes, max_blocks, self.scratch_block)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One tiny forward through the cache (scratch block), then graph capture."""
        batch = ForwardBatch.build(
            [[0]],
            block_tables=[[self.scratch_block]],
            block_size=self.block_size,
            device=self.device,
        )
        self.model(batch, self.kv_cache)
        if self.graphs is not None:
            self.graphs.capture()

    @torch.inference_mode()
    def forward(
        self,
        chunks: Sequence[ScheduledChunk],
        tables: Sequence[list[int]],
        prompt_rows: Sequence[list[int]] | None = None,
    ) -> Tensor:
        """Logits (N, vocab), chunk after chunk: the rows ``prompt_rows[i]`` of chunk i
        (offsets whose logits give prompt logprobs), then its last row if it samples."""
        extra = prompt_rows if prompt_rows is not None and any(prompt_rows) else None
        if (
            self.graphs is not None
            and extra is None
            and all(c.length == 1 and c.produces_token for c in chunks)
        ):
            logits = self.graphs.run(chunks, tables)
            if logits is not None:
                return logits
        tokens = [c.seq.token_ids[c.start : c.start + c.length] for c in chunks]
        rows = [
            (list(extra[i]) if extra is not None else [])
            + ([c.length - 1] if c.produces_token else [])
            for i, c in enumerate(chunks)
        ]
        batch = ForwardBatch.build(
            tokens,
            start_pos=[c.start for c in chunks],
            block_tables=tables,
            block_size=self.block_size,
            device=self.device,
            logits_rows=rows,
        )
        return self.model(batch, self.kv_cache)

    @torch.inference_mode()
    def embed(
        self, inputs: Sequence[Sequence[int]], pooling: str, normalize: bool
    ) -> list[list[float]]:
        """Pooled final hidden states; no KV cache is written."""
        batch = ForwardBatch.build(inputs, device=self.device)
        hidden = self.model(batch, None, return_hidden=True).float()  # (T, C)
        pooled = []
        for h in hidden.split([len(t) for t in inputs]):
            pooled.append(h.mean(dim=0) if pooling == "mean" else h[-1])
        out = torch.stack(pooled)  # (B, C)
        if normalize:
            out = F.normalize(out, dim=-1)
        return out.cpu().tolist()
