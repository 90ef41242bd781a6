"""A plain generation loop over one sequence: the bare-model baseline and the CLI's path.

The server does not use this (the engine batches many sequences); it exists so
that the model can be driven without the service, and so that the engine's
overhead can be measured against the model alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from model.gpt import GPT
from model.kv_cache import ForwardBatch, KVCache


def _table(cache: KVCache, n_tokens: int) -> list[int]:
    n_blocks = -(-n_tokens // cache.block_size)
    if n_blocks > cache.num_blocks:
        raise ValueError(
            f"{n_tokens} tokens do not fit a cache of {cache.num_blocks * cache.block_size}"
        )
    return list(range(n_blocks))


@torch.inference_mode()
def prefill(model: GPT, cache: KVCache, prompt_ids: list[int], total_len: int) -> Tensor:
    """Run the prompt through the model; logits of its last token (vocab,)."""
    table = _table(cache, total_len)
    batch = ForwardBatch.build(
        [prompt_ids], block_tables=[table], block_size=cache.block_size, device=model.device
    )
    return model(batch, cache)[0]


@torch.inference_mode()
def decode_one_token(model: GPT, cache: KVCache, token: int, pos: int, table: list[int]) -> Tensor:
    """Feed one token at position ``pos``; logits of the next (vocab,)."""
    batch = ForwardBatch.build(
        [[token]],
        start_pos=[pos],
        block_tables=[table],
        block_size=cache.block_size,
        device=model.device,
    )
    return model(batch, cache)[0]


def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    cache: KVCache | None = None,
    pick: Callable[[Tensor], int] | None = None,
    stop_ids: frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Yield new token ids one at a time (greedy unless ``pick`` chooses otherwise)."""
    total = len(prompt_ids) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) plus max_new_tokens ({max_new_tokens}) exceeds the "
            f"context of {model.config.max_seq_len} tokens"
        )
    if cache is None:
        cache = KVCache.for_tokens(model.config, total, dtype=model.dtype, device=model.device)
    choose = pick or (lambda logits: int(logits.argmax()))
    table = _table(cache, total)
    logits = prefill(model, cache, prompt_ids, total)
    pos = len(prompt_ids)
    for i in range(max_new_tokens):
        token = choose(logits)
        yield token
        if token in stop_ids or i == max_new_tokens - 1:
            return
        logits = decode_one_token(model, cache, token, pos, table)
        pos += 1
