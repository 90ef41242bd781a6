"""The GPT over ragged batches and the paged KV cache, checked against transformers.

Models come from tiny random HF checkpoints through the production loader, so
cached decoding is compared to the reference implementation, not only to itself.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from model.config import ConfigError, ModelConfig
from model.gpt import GPT
from model.kv_cache import ForwardBatch, KVCache
from model.loading import load_hf_dir

BLOCK = 4  # small blocks: every sequence spans several, in scattered order
TOL: dict[str, Any] = dict(rtol=1e-4, atol=1e-4)
PROMPT = [5, 61, 33, 7, 90, 14, 2, 48, 48, 19, 70, 26, 3, 84, 11, 59, 37, 6, 95]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, hf_checkpoint):
    """(our model, the HF checkpoint it was loaded from)."""
    settings = dict(n_kv_head=2) if request.param == "llama" else dict(tied=True)
    ckpt = hf_checkpoint(request.param, **settings)
    model, _ = load_hf_dir(ckpt.path)
    return model, ckpt


def scattered_tables(lengths: list[int], num_blocks: int, seed: int = 0) -> list[list[int]]:
    """Disjoint, shuffled (non-contiguous) block tables with room for each length."""
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    tables = []
    for n in lengths:
        need = -(-n // BLOCK)
        tables.append(pool[:need])
        pool = pool[need:]
    return tables


def run(model, kv, chunks, starts, tables, all_rows=True):
    rows = [list(range(len(c))) for c in chunks] if all_rows else None
    batch = ForwardBatch.build(
        chunks, start_pos=starts, block_tables=tables, block_size=BLOCK, logits_rows=rows
    )
    with torch.no_grad():
        return model(batch, kv_cache=kv)


def test_step_by_step_decoding_matches_transformers(pair):
    model, ckpt = pair
    reference = ckpt.logits(PROMPT)  # (T, vocab), one full forward in transformers
    kv = KVCache(model.config, num_blocks=16, block_size=BLOCK)
    table = scattered_tables([len(PROMPT)], 16, seed=1)
    prefill = 3
    torch.testing.assert_close(
        run(model, kv, [PROMPT[:prefill]], [0], table), reference[:prefill], **TOL
    )
    for pos in range(prefill, len(PROMPT)):
        logits = run(model, kv, [[PROMPT[pos]]], [pos], table)
        torch.testing.assert_close(logits[0], reference[pos], **TOL)


def test_chunked_prefill_equals_one_shot(pair):
    model, _ = pair
    one_shot = run(model, None, [PROMPT], [0], None)
    kv = KVCache(model.config, num_blocks=12, block_size=BLOCK)
    table = scattered_tables([len(PROMPT)], 12, seed=2)
    got, start = [], 0
    for size in (5, 1, 7, 6):
        got.append(run(model, kv, [PROMPT[start : start + size]], [start], table))
        start += size
    torch.testing.assert_close(torch.cat(got), one_shot, **TOL)


def test_ragged_batch_equals_each_sequence_alone(pair):
    model, _ = pair
    seqs = [PROMPT[:9], PROMPT[4:17], PROMPT[10:14]]
    alone = [run(model, None, [s], [0], None) for s in seqs]  # (len, vocab) each
    kv = KVCache(model.config, num_blocks=24, block_size=BLOCK)
    tables = scattered_tables([len(s) for s in seqs], 24, seed=3)
    # Each step: {sequence: (start, length)}; prefill chunks and decode steps mix.
    steps = [
        {0: (0, 7), 1: (0, 5)},
        {0: (7, 1), 1: (5, 6), 2: (0, 3)},
        {0: (8, 1), 1: (11, 1), 2: (3, 1)},  # all decode: the batched decode path
        {1: (12, 1)},
    ]
    for step in steps:
        ids = list(step)
        chunks = [seqs[i][s : s + n] for i, (s, n) in step.items()]
        logits = run(model, kv, chunks, [s for s, _ in step.values()], [tables[i] for i in ids])
        expected = torch.cat([alone[i][s : s + n] for i, (s, n) in step.items()])
        torch.testing.assert_close(logits, expected, **TOL)


def test_return_hidden_shapes_and_head(pair):
    model, _ = pair
    chunks = [PROMPT[:6], PROMPT[:3]]
    batch = ForwardBatch.build(chunks)
    with torch.no_grad():
        hidden = model(batch, return_hidden=True)
        logits = model(batch)
    assert hidden.shape == (9, model.config.n_embd)
    assert logits.shape == (2, model.config.vocab_size)  # default: last token of each sequence
    torch.testing.assert_close(model.lm_head(hidden[[5, 8]]), logits, **TOL)


def test_position_past_context_is_refused(pair):
    model, _ = pair
    batch = ForwardBatch.build([[1] * (model.config.max_seq_len + 1)])
    with pytest.raises(ValueError, match="context"):
        model(batch)


BASE = dict(arch="llama", vocab_size=50, n_layer=2, n_head=4, n_embd=32, intermediate_size=48)


def test_random_model_runs_through_the_cache():
    config = ModelConfig(**BASE, n_kv_head=1, max_seq_len=32)
    model = GPT.random(config, seed=0)
    kv = KVCache(config, num_blocks=8, block_size=BLOCK)
    full = run(model, None, [[1, 2, 3, 4, 5]], [0], None)
    table = scattered_tables([5], 8)
    run(model, kv, [[1, 2, 3, 4]], [0], table)
    torch.testing.assert_close(run(model, kv, [[5]], [4], table)[0], full[4], **TOL)


@pytest.mark.parametrize(
    "changes",
    [
        dict(arch="mamba"),
        dict(vocab_size=0),
        dict(n_layer=-1),
        dict(n_head=0),
        dict(n_kv_head=3),
        dict(n_embd=30),
        dict(head_dim=7),
        dict(intermediate_size=None),
        dict(activation="relu"),
        dict(norm_eps=0.0),
        dict(rope_theta=-1.0),
        dict(max_seq_len=0),
    ],
    ids=lambda c: ",".join(c),
)
def test_bad_config_raises_config_error(changes):
    with pytest.raises(ConfigError):
        ModelConfig(**{**BASE, **changes})


def test_from_hf_rejects_unknown_model_type():
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf({"model_type": "bert"})
