"""CUDA graph decode == eager decode, token for token (needs a GPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model.registry import DEFAULT_MODEL
from service.engine.config import EngineConfig
from service.engine.cuda_graphs import DecodeGraphs, width_buckets
from service.engine.engine import Engine
from service.engine.types import SamplingParams
from tests.engine.engine_testlib import (
    ByteTokenizer,
    collect,
    greedy,
    prompt_of,
    run,
    tiny_model,
    tokens_of,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_width_buckets_cover_the_maximum() -> None:
    assert width_buckets(512) == [8, 16, 32, 64, 128, 256, 512]
    assert width_buckets(100) == [8, 16, 32, 64, 100]
    assert width_buckets(4) == [4]


def test_padded_static_batches_decode_like_the_plain_path() -> None:
    """The graphs' input filling and padding (scratch block, width buckets), run
    eagerly on the CPU: the same tokens as the plain decode path."""

    def make(graphs: bool) -> Engine:
        cfg = EngineConfig(max_num_seqs=32, max_batched_tokens=128, kv_cache_tokens=8192)
        engine = Engine(tiny_model(), ByteTokenizer(), cfg, "tiny")
        if graphs:
            runner = engine.runner
            runner.graphs = DecodeGraphs(
                runner.model, runner.kv_cache, [1, 4, 8, 32], 512 // 16, runner.scratch_block
            )
        return engine

    padded = run_all(make, False)
    assert padded == run_all(make, None)


def cases() -> list[tuple[list[int], SamplingParams]]:
    out: list[tuple[list[int], SamplingParams]] = []
    for i in range(20):  # 20 streams: padded to the 32 bucket, contexts crossing width buckets
        params = greedy(40 + 7 * i, ignore_eos=True)
        if i % 4 == 3:
            params = SamplingParams(
                max_tokens=60, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True
            )
        out.append((prompt_of(i, 5 + 11 * i), params))
    return out


class EagerDecodeGraphs(DecodeGraphs):
    """The graphs' padded static batches, run eagerly: the same arithmetic, no capture."""

    def capture(self) -> None:
        self._pad_inputs()

    def _replay(self, b: int, w: int) -> torch.Tensor:
        return self.model(self._batch(b, w), self.kv_cache)


def run_all(make, replay: bool | None) -> list[list[int]]:
    """replay None: no graphs at all; True: graph replay; False: the graphs' padded
    static batches run eagerly (same arithmetic as the graph, no capture)."""
    engine = make(replay is not None)
    if replay is False:
        g = engine.runner.graphs
        engine.runner.graphs = EagerDecodeGraphs(
            g.model, g.kv_cache, g.sizes, g.widths[-1], g.scratch
        )
    engine.start()

    async def main():
        got = await asyncio.gather(*(collect(engine, p, params) for p, params in cases()))
        return [tokens_of(e) for e in got]

    return run(engine, main)  # also checks that no KV block leaked


@pytest.mark.gpu
@cuda
def test_graph_decode_equals_eager_on_a_tiny_model() -> None:
    model = tiny_model(device="cuda")

    def make(graphs: bool) -> Engine:
        cfg = EngineConfig(
            max_num_seqs=32, max_batched_tokens=128, kv_cache_tokens=16384, cuda_graphs=graphs
        )
        return Engine(model, ByteTokenizer(), cfg, "tiny")

    replayed = run_all(make, True)
    assert replayed == run_all(make, False)
    # float32 with wide logit gaps: padding the batch changes no argmax either.
    assert replayed == run_all(make, None)


@pytest.mark.gpu
@pytest.mark.slow
@cuda
def test_graph_decode_equals_eager_on_the_default_model_in_bf16() -> None:
    from model.loading import load_model
    from model.tokenizer import Tokenizer

    loaded = load_model(DEFAULT_MODEL, dtype=torch.bfloat16, device="cuda")
    tokenizer = Tokenizer.from_path(loaded.path)

    def make(graphs: bool) -> Engine:
        cfg = EngineConfig(max_num_seqs=32, kv_cache_tokens=65536, cuda_graphs=graphs)
        return Engine(loaded.model, tokenizer, cfg, "default")

    # bf16 rounding may depend on the padded shape, so the eager reference runs the
    # very same padded batches; what differs is only capture and replay.
    assert run_all(make, True) == run_all(make, False)
