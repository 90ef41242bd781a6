"""Abort and disconnects, request-level and fatal errors, validation, queue bounds,
start/stop, embeddings and metrics."""

from __future__ import annotations

import asyncio
import math
import platform
import subprocess
import sys

import pytest
import torch
from prometheus_client import generate_latest

from model.kv_cache import ForwardBatch
from service.engine import engine as engine_module
from service.engine import sampler as sampler_module
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.types import (
    BadRequest,
    ContextLengthExceeded,
    EngineDead,
    EngineUnavailable,
    GenerateRequest,
    QueueFull,
    RequestFailed,
    SamplingParams,
)
from tests.engine.engine_testlib import (
    ByteTokenizer,
    collect,
    greedy,
    make_engine,
    metric,
    prompt_of,
    reference_greedy,
    run,
    tiny_model,
    tokens_of,
)


async def wait_until(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.001)


def long_request(rid: str = "long") -> GenerateRequest:
    return GenerateRequest(prompt_of(1, 40), greedy(400, ignore_eos=True), rid)


async def blocks_back(engine) -> None:
    await wait_until(lambda: engine.blocks.num_free_blocks == engine.blocks.num_blocks)


def aborts(engine) -> float:
    return metric(engine, "gptserve_request_success_total", finished_reason="abort")


def engine_steps(engine) -> float:
    """Steps run so far: every step observes its token count once."""
    return metric(engine, "gptserve_iteration_tokens_count")


# -- abort and disconnects -------------------------------------------------------------


def test_abort_frees_blocks_within_one_step() -> None:
    engine = make_engine()

    async def main():
        stream = engine.generate(long_request())
        events = [await anext(stream) for _ in range(3)]
        assert engine.kv_cache_usage > 0
        engine.abort("long")
        async for ev in stream:
            events.append(ev)
        # The abort event is sent after the blocks were freed, in the same step.
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        return events

    events = run(engine, main)
    assert events[-1].finish_reason == "abort" and events[-1].usage.completion_tokens < 400
    assert aborts(engine) == 1


async def consumer_gone_frees_blocks(engine, leave) -> None:
    stream = engine.generate(long_request())
    await anext(stream)
    steps = engine_steps(engine)
    await leave(stream)
    await blocks_back(engine)
    assert engine_steps(engine) - steps <= 3  # the loop noticed within a step or so
    await wait_until(lambda: engine.num_running == 0)


def test_closing_the_stream_aborts() -> None:
    engine = make_engine()
    run(engine, lambda: consumer_gone_frees_blocks(engine, lambda s: s.aclose()))
    assert aborts(engine) == 1


def test_breaking_out_of_async_for_aborts() -> None:
    engine = make_engine()

    async def main():
        async for _ in engine.generate(long_request()):
            break  # the generator is dropped: asyncio finalises it, which aborts
        await blocks_back(engine)

    run(engine, main)
    assert aborts(engine) == 1


def test_cancelling_the_consumer_task_aborts() -> None:
    engine = make_engine()

    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(long_request()):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await blocks_back(engine)

    run(engine, main)
    assert aborts(engine) == 1


def test_a_stream_dropped_unread_is_aborted() -> None:
    engine = make_engine()

    async def main():
        engine.generate(long_request())  # never iterated, dropped at once
        await wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0)
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks

    run(engine, main)
    assert aborts(engine) == 1


def test_finished_streams_leave_no_abort_behind() -> None:
    engine = make_engine()

    async def main():
        for _ in range(3):
            await collect(engine, prompt_of(1, 5), greedy(2, ignore_eos=True))
        assert not engine._aborts

    run(engine, main)


# -- failures ---------------------------------------------------------------------------


def test_poisoned_request_fails_alone(monkeypatch) -> None:
    engine = make_engine()
    real = engine_module.sampling_row

    def poisoned(seq):
        if seq.request_id == "bad" and seq.num_output_tokens == 2:
            raise RuntimeError("boom")
        return real(seq)

    monkeypatch.setattr(engine_module, "sampling_row", poisoned)
    good = [(prompt_of(i, 10 + i), 8) for i in range(3)]

    async def bad():
        with pytest.raises(RequestFailed):
            await collect(engine, prompt_of(9, 10), greedy(8, ignore_eos=True), "bad")

    async def main():
        results = await asyncio.gather(
            bad(), *(collect(engine, p, greedy(n, ignore_eos=True)) for p, n in good)
        )
        after = await collect(engine, prompt_of(5, 7), greedy(4, ignore_eos=True))
        return results[1:], after

    results, after = run(engine, main)
    for (p, n), events in zip(good, results):
        assert tokens_of(events) == reference_greedy(tiny_model(), p, n)
    assert tokens_of(after) == reference_greedy(tiny_model(), prompt_of(5, 7), 4)
    assert metric(engine, "gptserve_request_success_total", finished_reason="error") == 1


def test_poisoned_sampled_request_in_a_random_batch_fails_alone(monkeypatch) -> None:
    """A bad row inside the batched sampler: found by sampling the rows one by one."""
    engine = make_engine()
    real = sampler_module.sample

    def fragile(logits, batch):
        if batch.size > 1 and float(batch.temperature.max()) > 1.5:
            raise RuntimeError("one row is bad")
        if batch.size == 1 and float(batch.temperature.max()) > 1.5:
            raise RuntimeError("this row")
        return real(logits, batch)

    monkeypatch.setattr(sampler_module, "sample", fragile)

    async def bad():
        with pytest.raises(RequestFailed):
            await collect(
                engine, prompt_of(9, 10), SamplingParams(max_tokens=5, temperature=2.0, seed=1)
            )

    async def main():
        ok = collect(
            engine,
            prompt_of(3, 10),
            SamplingParams(max_tokens=5, temperature=0.5, seed=1, ignore_eos=True),
        )
        return (await asyncio.gather(bad(), ok))[1]

    assert len(tokens_of(run(engine, main))) == 5


def test_fatal_forward_error_kills_the_engine(monkeypatch) -> None:
    engine = make_engine()

    async def main():
        stream = engine.generate(long_request())
        await anext(stream)

        def broken(*args, **kwargs):
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine.runner, "forward", broken)
        with pytest.raises(EngineDead):
            async for _ in stream:
                pass
        with pytest.raises(EngineDead):
            engine.check_health()
        with pytest.raises(EngineDead):
            engine.generate(GenerateRequest([1, 2], greedy(2)))
        with pytest.raises(EngineDead):
            await engine.embed([[1, 2]])

    asyncio.run(main())
    asyncio.run(engine.stop(0.1))  # stopping a dead engine is harmless


# -- validation and bounds ------------------------------------------------------------------


def test_context_length_is_checked_before_admission() -> None:
    engine = make_engine()

    async def main():
        with pytest.raises(ContextLengthExceeded) as err:
            engine.generate(GenerateRequest(prompt_of(1, 500), greedy(20)))
        for number in ("500", "20", "512"):
            assert number in err.value.message
        with pytest.raises(BadRequest):
            engine.generate(GenerateRequest([], greedy(2)))
        with pytest.raises(BadRequest):
            engine.generate(GenerateRequest([1, 260], greedy(2)))
        with pytest.raises(BadRequest):
            engine.generate(GenerateRequest([1], greedy(0)))
        assert engine.num_waiting == 0

    run(engine, main)


def test_max_model_len_shrinks_to_the_cache() -> None:
    engine = make_engine(kv_cache_tokens=128)
    assert engine.max_model_len == 128
    run(engine, lambda: asyncio.sleep(0))


def test_queue_full() -> None:
    engine = make_engine(max_num_seqs=1, max_queue_requests=1)

    async def main():
        first = engine.generate(long_request("a"))
        await anext(first)  # "a" is running; the queue is empty
        second = engine.generate(long_request("b"))
        with pytest.raises(QueueFull) as err:
            engine.generate(long_request("c"))
        assert err.value.retry_after > 0
        await first.aclose()
        await second.aclose()

    run(engine, main)


def test_not_started_and_draining_refuse_requests() -> None:
    idle = Engine(tiny_model(), ByteTokenizer(), EngineConfig(kv_cache_tokens=256), "tiny")

    async def refused():
        with pytest.raises(EngineUnavailable):
            idle.generate(GenerateRequest([1], greedy(2)))

    asyncio.run(refused())
    engine = make_engine()

    async def main():
        stream = engine.generate(long_request())
        await anext(stream)
        stopping = asyncio.create_task(engine.stop(drain_timeout=0.05))
        await asyncio.sleep(0)
        with pytest.raises(EngineUnavailable):
            engine.generate(GenerateRequest([1], greedy(2)))
        events = [ev async for ev in stream]
        await stopping
        return events

    events = run(engine, main)
    assert events[-1].finish_reason == "abort"  # did not finish within the drain timeout


def test_drain_lets_short_requests_finish() -> None:
    engine = make_engine()

    async def main():
        stream = engine.generate(GenerateRequest(prompt_of(1, 5), greedy(10, ignore_eos=True)))
        stopping = asyncio.create_task(engine.stop(drain_timeout=30))
        events = [ev async for ev in stream]
        await stopping
        return events

    events = run(engine, main)
    assert events[-1].finish_reason == "length" and len(tokens_of(events)) == 10


# -- embeddings -----------------------------------------------------------------------------


@torch.inference_mode()
def direct_hidden(ids: list[int]) -> torch.Tensor:
    return tiny_model()(ForwardBatch.build([ids]), return_hidden=True)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_match_a_direct_forward(pooling) -> None:
    engine = make_engine(max_batched_tokens=32)
    inputs = [prompt_of(i, 5 + 9 * i) for i in range(5)] + ["hello €"]  # some longer than a step

    async def main():
        raw = await engine.embed(inputs, pooling=pooling, normalize=False)
        unit = await engine.embed(inputs, pooling=pooling)
        return raw, unit

    raw, unit = run(engine, main)
    token_lists = inputs[:-1] + [engine.tokenizer.encode("hello €")]
    assert raw.prompt_tokens == sum(len(t) for t in token_lists)
    for ids, got, normed in zip(token_lists, raw.embeddings, unit.embeddings):
        h = direct_hidden(ids)
        want = h.mean(0) if pooling == "mean" else h[-1]
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-4)
        assert math.isclose(sum(x * x for x in normed), 1.0, rel_tol=1e-5)
        torch.testing.assert_close(
            torch.tensor(normed), torch.nn.functional.normalize(want, dim=0), rtol=1e-4, atol=1e-5
        )


def test_embeddings_validate_and_hold_no_blocks() -> None:
    engine = make_engine()

    async def main():
        gen = asyncio.create_task(collect(engine, prompt_of(2, 30), greedy(30, ignore_eos=True)))
        result = await engine.embed([[1, 2, 3]])
        bad_inputs: list[list[list[int]]] = [[], [[]], [[300]]]
        for bad in bad_inputs:
            with pytest.raises(BadRequest):
                await engine.embed(bad)
        with pytest.raises(ContextLengthExceeded):
            await engine.embed([prompt_of(1, 513)])
        await gen
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        return result

    assert len(run(engine, main).embeddings[0]) == 64


# -- metrics --------------------------------------------------------------------------------

NAMES = [
    "gptserve_requests_running",
    "gptserve_requests_waiting",
    "gptserve_kv_cache_usage_ratio",
    "gptserve_prompt_tokens_total",
    "gptserve_generation_tokens_total",
    "gptserve_request_success_total",
    "gptserve_prefix_cache_queries_total",
    "gptserve_prefix_cache_hits_total",
    "gptserve_preemptions_total",
    "gptserve_time_to_first_token_seconds_bucket",
    "gptserve_inter_token_latency_seconds_bucket",
    "gptserve_e2e_request_latency_seconds_bucket",
    "gptserve_request_queue_time_seconds_bucket",
    "gptserve_request_prefill_time_seconds_bucket",
    "gptserve_request_decode_time_seconds_bucket",
    "gptserve_iteration_tokens_bucket",
]


def test_metrics_exist_and_move() -> None:
    engine = make_engine()
    prompts = [prompt_of(i, 10 + i) for i in range(4)]

    async def main():
        seen_running = []
        stream = engine.generate(long_request())
        await anext(stream)
        await wait_until(lambda: metric(engine, "gptserve_requests_running") == 1)
        seen_running.append(metric(engine, "gptserve_kv_cache_usage_ratio"))
        await stream.aclose()
        await asyncio.gather(*(collect(engine, p, greedy(6, ignore_eos=True)) for p in prompts))
        return seen_running

    (usage_while_running,) = run(engine, main)
    text = generate_latest(engine.registry).decode()
    lines = text.splitlines()
    for name in NAMES:
        assert any(ln.startswith(name + "{") and 'model_name="tiny"' in ln for ln in lines), name
    assert usage_while_running > 0
    assert metric(engine, "gptserve_prompt_tokens_total") == 40 + sum(len(p) for p in prompts)
    assert metric(engine, "gptserve_generation_tokens_total") >= 24 + 1
    assert metric(engine, "gptserve_request_success_total", finished_reason="length") == 4
    assert metric(engine, "gptserve_time_to_first_token_seconds_count") == 5
    assert metric(engine, "gptserve_e2e_request_latency_seconds_count") == 5
    assert metric(engine, "gptserve_inter_token_latency_seconds_count") >= 4 * 5
    assert metric(engine, "gptserve_request_queue_time_seconds_count") == 5
    assert metric(engine, "gptserve_iteration_tokens_sum") >= 40 + sum(len(p) for p in prompts)
    assert metric(engine, "gptserve_kv_cache_usage_ratio") == 0
    assert metric(engine, "gptserve_requests_running") == 0


_FRAGMENTED_HEAP = """
import sys
from service.engine.engine import release_free_heap

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

blocks = [bytearray(64 * 1024) for _ in range(2000)]  # ~125 MiB on the heap
del blocks[::2]  # every other one freed: holes that free() alone keeps resident
before = rss_mib()
if not release_free_heap():
    sys.exit(3)
print(before - rss_mib())
"""


def test_release_free_heap_returns_freed_holes_to_the_system():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    out = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True
    )
    assert float(out.stdout) > 40  # of the ~62 MiB of holes
