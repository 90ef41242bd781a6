"""The scheduler alone: token budget, decode-first order, chunked prefill, queue bounds,
preemption; every test ends with the pool back to its initial free count."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.engine.block_manager import BlockManager
from service.engine.config import EngineConfig
from service.engine.scheduler import Scheduler, Seq, SeqStatus, Step
from service.engine.types import QueueFull


@pytest.fixture
def sched(request: pytest.FixtureRequest) -> Iterator[Scheduler]:
    kw = getattr(request, "param", {})
    cfg = EngineConfig(**{"max_num_seqs": 8, "max_batched_tokens": 32, "block_size": 4, **kw})
    num_blocks = kw.get("kv_cache_tokens", 1024) // cfg.block_size
    s = Scheduler(cfg, BlockManager(num_blocks, cfg.block_size))
    yield s
    # Whatever the test did, finishing every sequence gives every block back.
    for seq in list(s.running) + list(s.waiting):
        s.finish(seq)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks
    assert not s.blocks.tables


def seq(rid: str, prompt_len: int, max_tokens: int = 4, first: int = 0) -> Seq:
    # The scheduler never reads the engine's per-request state.
    return Seq(rid, list(range(first, first + prompt_len)), prompt_len, max_tokens, state=None)


def advance(s: Scheduler, step: Step, token: int = 7) -> None:
    """What the engine does after a forward pass: update, append sampled tokens, finish."""
    s.update(step)
    for chunk in step.chunks:
        if chunk.produces_token and chunk.seq.status == SeqStatus.RUNNING:
            chunk.seq.token_ids.append(token)
            if chunk.seq.num_output_tokens >= chunk.seq.max_tokens:
                s.finish(chunk.seq)


def run_all(s: Scheduler, limit: int = 500) -> list[Step]:
    steps: list[Step] = []
    while s.has_work() and len(steps) < limit:
        step = s.schedule()
        steps.append(step)
        advance(s, step)
    assert not s.has_work(), "the scheduler made no progress"
    return steps


def test_budget_holds_every_step(sched: Scheduler) -> None:
    for i in range(6):
        sched.add(seq(f"r{i}", 5 + 9 * i, max_tokens=6))
    steps = run_all(sched)
    assert all(0 < st.num_tokens <= 32 for st in steps)
    assert max(st.num_tokens for st in steps) == 32  # the budget is actually used


def test_decodes_come_before_prefill_chunks(sched: Scheduler) -> None:
    sched.add(seq("a", 3, max_tokens=20))
    sched.add(seq("b", 3, max_tokens=20))
    advance(sched, sched.schedule())  # both prefilled, both decoding now
    sched.add(seq("long", 100))
    step = sched.schedule()
    kinds = ["decode" if c.length == 1 and c.produces_token else "prefill" for c in step.chunks]
    assert kinds == ["decode", "decode", "prefill"]
    assert step.chunks[2].length == 30  # what the two decodes left of the budget
    advance(sched, step)


def test_long_prompt_is_chunked_and_running_streams_keep_decoding(sched: Scheduler) -> None:
    sched.add(seq("stream", 2, max_tokens=10))
    advance(sched, sched.schedule())
    long = seq("long", 100, max_tokens=1)
    sched.add(long)
    chunk_lens = []
    while long.status != SeqStatus.FINISHED:
        step = sched.schedule()
        assert any(c.seq.request_id == "stream" for c in step.chunks) or sched.running == [long]
        chunk_lens += [c.length for c in step.chunks if c.seq is long]
        advance(sched, step)
    assert sum(chunk_lens) == 100 and len(chunk_lens) == 4  # 31 + 31 + 31 + 7
    assert max(chunk_lens) == 31


def test_queue_bound_by_requests() -> None:
    cfg = EngineConfig(max_num_seqs=2, max_batched_tokens=8, max_queue_requests=2)
    s = Scheduler(cfg, BlockManager(64, 16))
    s.add(seq("a", 4))
    s.add(seq("b", 4))
    with pytest.raises(QueueFull) as err:
        s.add(seq("c", 4))
    assert err.value.retry_after > 0


def test_queue_bound_by_tokens() -> None:
    cfg = EngineConfig(max_num_seqs=2, max_batched_tokens=8, max_queue_tokens=100)
    s = Scheduler(cfg, BlockManager(64, 16))
    s.add(seq("a", 60))
    with pytest.raises(QueueFull):
        s.add(seq("b", 41))
    s.add(seq("c", 40))  # exactly at the bound is fine


@pytest.mark.parametrize("sched", [{"kv_cache_tokens": 48}], indirect=True)
def test_preempts_the_most_recent_and_recomputes(sched: Scheduler) -> None:
    for i in range(4):
        sched.add(seq(f"r{i}", 8, max_tokens=12, first=10 * i))
    steps = run_all(sched)
    preempted = [p.request_id for st in steps for p in st.preempted]
    assert preempted, "12 blocks cannot hold 4 sequences of 20 tokens: someone must be preempted"
    assert "r0" not in preempted  # the oldest always makes progress
    # A preempted sequence is recomputed from its prompt and its generated tokens.
    first = next(st for st in steps if st.preempted)
    victim = first.preempted[0]
    again = next(st for st in steps[steps.index(first) + 1 :] for c in st.chunks if c.seq is victim)
    chunk = next(c for c in again.chunks if c.seq is victim)
    assert chunk.start == 0 and chunk.length > victim.num_prompt_tokens


def test_max_num_seqs_bounds_running(sched: Scheduler) -> None:
    for i in range(12):
        sched.add(seq(f"r{i}", 2, max_tokens=30))
    sched.schedule()
    assert len(sched.running) == 8 and len(sched.waiting) == 4


def test_prefix_hit_skips_shared_blocks_but_not_the_last_token(sched: Scheduler) -> None:
    a = seq("a", 12, max_tokens=1)
    sched.add(a)
    run_all(sched)
    b = seq("b", 12, max_tokens=1)  # same 12 tokens: 3 full blocks of 4
    sched.add(b)
    step = sched.schedule()
    assert step.prefix_hits == 8 and b.num_cached_tokens == 8  # the last block is recomputed
    assert [(c.start, c.length) for c in step.chunks] == [(8, 4)]
    advance(sched, step)
