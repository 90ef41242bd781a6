"""Generation through the engine on a tiny random model: batching never changes a
token (greedy or seeded), nor do preemption and the prefix cache; finishing rules."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.types import SamplingParams
from tests.engine.engine_testlib import (
    EOS,
    ByteTokenizer,
    collect,
    greedy,
    make_engine,
    metric,
    prompt_of,
    reference_greedy,
    run,
    text_of,
    tiny_model,
    tokens_of,
)

# 18 requests: prompts from 1 to 150 tokens (several longer than the 64-token
# step budget: chunked prefill), outputs from 1 to 24 tokens.
CASES = [(prompt_of(i, 1 + (37 * i) % 150), 1 + (5 * i) % 24) for i in range(18)]


def sampled(seed: int, n: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=n, temperature=0.9, top_k=40, top_p=0.95, seed=seed, ignore_eos=True
    )


async def together(engine, cases) -> list[list[int]]:
    results = await asyncio.gather(*(collect(engine, p, params) for p, params in cases))
    return [tokens_of(r) for r in results]


async def one_by_one(engine, cases) -> list[list[int]]:
    return [tokens_of(await collect(engine, p, params)) for p, params in cases]


@pytest.fixture(scope="module")
def alone_greedy() -> list[list[int]]:
    """Each request alone, prefix caching off: the engine's own reference."""
    engine = make_engine(enable_prefix_caching=False)
    cases = [(p, greedy(n, ignore_eos=True)) for p, n in CASES]
    return run(engine, lambda: one_by_one(engine, cases))


def test_alone_matches_a_plain_greedy_loop(alone_greedy) -> None:
    for (prompt, n), got in zip(CASES, alone_greedy):
        assert got == reference_greedy(tiny_model(), prompt, n)


def test_concurrent_greedy_gives_the_same_tokens(alone_greedy) -> None:
    engine = make_engine()
    cases = [(p, greedy(n, ignore_eos=True)) for p, n in CASES]
    got = run(engine, lambda: together(engine, cases))
    assert got == alone_greedy
    assert metric(engine, "gptserve_iteration_tokens_sum") == sum(
        len(p) + n - 1 for p, n in CASES
    ) - (metric(engine, "gptserve_prefix_cache_hits_total"))


def test_preemption_keeps_outputs_exact(alone_greedy) -> None:
    # 256 cache tokens for ~1,900 tokens of work: sequences are preempted and recomputed.
    engine = make_engine(kv_cache_tokens=256)
    cases = [(p, greedy(n, ignore_eos=True)) for p, n in CASES]
    seeded = [(prompt_of(100 + i, 20), sampled(i, 30)) for i in range(4)]
    got = run(engine, lambda: together(engine, cases + seeded))
    assert got[: len(CASES)] == alone_greedy
    assert metric(engine, "gptserve_preemptions_total") > 0
    solo = make_engine()
    assert run(solo, lambda: one_by_one(solo, seeded)) == got[len(CASES) :]


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_compact_kv_cache(alone_greedy, kv_dtype) -> None:
    """A half-size cache is stored in its dtype. float16 (11-bit mantissa) keeps the
    tiny model's greedy tokens (its logit gaps are wide); bfloat16 (8 bits) may flip
    some late tokens, but most sequences come out the same."""
    import torch

    engine = make_engine(kv_cache_dtype=kv_dtype)
    assert engine.runner.kv_cache.dtype == getattr(torch, kv_dtype)
    cases = [(p, greedy(n, ignore_eos=True)) for p, n in CASES]
    got = run(engine, lambda: together(engine, cases))
    assert [len(g) for g in got] == [len(a) for a in alone_greedy]
    same = sum(g == a for g, a in zip(got, alone_greedy, strict=True))
    assert same == len(CASES) if kv_dtype == "float16" else same >= len(CASES) // 2


def test_seeded_sampling_is_the_same_alone_and_in_a_full_batch() -> None:
    engine = make_engine()
    target = [(prompt_of(7, 30), sampled(1234, 40))]
    noise = [(prompt_of(50 + i, 5 + i), sampled(i, 20 + i)) for i in range(15)]
    mixed = noise[:8] + target + noise[8:]

    async def main():
        alone = await one_by_one(engine, target)
        batched = await together(engine, mixed)
        return alone[0], batched[8]

    alone, batched = run(engine, main)
    assert alone == batched
    assert len(set(alone)) > 5  # really sampled, not a degenerate repeat


def test_unseeded_requests_differ() -> None:
    engine = make_engine()
    params = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    got = run(engine, lambda: together(engine, [(prompt_of(3, 10), params)] * 2))
    assert got[0] != got[1]


def test_prefix_cache_hits_and_outputs_identical() -> None:
    shared = prompt_of(9, 80)  # five full blocks of 16
    cases = [(shared + prompt_of(20 + i, 3 + i), greedy(8, ignore_eos=True)) for i in range(6)]
    results = {}
    for caching in (True, False):
        engine = make_engine(enable_prefix_caching=caching)

        async def main(engine=engine):
            first = await collect(engine, *cases[0])
            rest = await asyncio.gather(*(collect(engine, p, params) for p, params in cases[1:]))
            return [first, *rest]

        events = run(engine, main)
        results[caching] = [tokens_of(e) for e in events]
        cached = [e[-1].usage.cached_tokens for e in events]
        if caching:
            assert cached == [0] + [80] * 5
            assert metric(engine, "gptserve_prefix_cache_hits_total") == 400
            assert metric(engine, "gptserve_prefix_cache_queries_total") == sum(
                len(p) for p, _ in cases
            )
        else:
            assert cached == [0] * 6
            assert metric(engine, "gptserve_prefix_cache_hits_total") == 0
    assert results[True] == results[False]


def test_eviction_under_pressure_keeps_outputs(alone_greedy) -> None:
    # 320 tokens of cache: cached prefixes are evicted to make room, repeatedly.
    engine = make_engine(kv_cache_tokens=320)
    cases = [(p, greedy(n, ignore_eos=True)) for p, n in CASES if len(p) + n <= 320]
    expected = [a for (p, n), a in zip(CASES, alone_greedy) if len(p) + n <= 320]

    async def main():
        first = await together(engine, cases)
        second = await together(engine, cases[::-1])
        return first, second[::-1]

    first, second = run(engine, main)
    assert first == expected and second == expected
    assert metric(engine, "gptserve_prefix_cache_hits_total") > 0


# -- finishing -----------------------------------------------------------------------

PROMPT = prompt_of(11, 12)


@pytest.fixture(scope="module")
def ref() -> list[int]:
    return reference_greedy(tiny_model(), PROMPT, 24)


def pick_new(ref: list[int]) -> int:
    """An index whose token did not appear before it."""
    return next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])


def test_max_tokens() -> None:
    engine = make_engine()
    events = run(engine, lambda: collect(engine, PROMPT, greedy(5, ignore_eos=True)))
    last = events[-1]
    assert len(tokens_of(events)) == 5 and last.finish_reason == "length"
    assert last.usage is not None
    assert last.usage.prompt_tokens == 12 and last.usage.completion_tokens == 5
    assert all(e.finish_reason is None for e in events[:-1])


def test_end_of_sequence(ref) -> None:
    k = pick_new(ref)
    engine = make_engine(tokenizer=ByteTokenizer(eos_token_ids=[ref[k], EOS]))
    events = run(engine, lambda: collect(engine, PROMPT, greedy(20)))
    assert tokens_of(events) == ref[: k + 1]
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason is None
    assert text_of(events) == ByteTokenizer().decode(ref[:k])  # the eos token's text is not emitted


def test_ignore_eos(ref) -> None:
    k = pick_new(ref)
    engine = make_engine(tokenizer=ByteTokenizer(eos_token_ids=[ref[k]]))
    events = run(engine, lambda: collect(engine, PROMPT, greedy(20, ignore_eos=True)))
    assert tokens_of(events) == ref[:20] and events[-1].finish_reason == "length"


def test_stop_token_ids(ref) -> None:
    k = pick_new(ref)
    engine = make_engine()
    events = run(
        engine,
        lambda: collect(engine, PROMPT, greedy(20, stop_token_ids=[ref[k]], ignore_eos=True)),
    )
    assert tokens_of(events) == ref[: k + 1]
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == ref[k]
    assert text_of(events) == ByteTokenizer().decode(ref[:k])  # nor is the stop token's


def test_stop_string_across_tokens(ref) -> None:
    full = ByteTokenizer().decode(ref)
    # A two-character stop string (at least two byte tokens) not seen earlier in the text.
    k = next(
        i
        for i in range(1, len(full) - 1)
        if "\ufffd" not in full[i : i + 2] and full.find(full[i : i + 2]) == i
    )
    stop = full[k : k + 2]
    engine = make_engine()
    events = run(engine, lambda: collect(engine, PROMPT, greedy(24, stop=[stop], ignore_eos=True)))
    assert text_of(events) == full[:k]
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == stop
    assert len(tokens_of(events)) < 24


def test_logprobs(ref) -> None:
    engine = make_engine()
    events = run(engine, lambda: collect(engine, PROMPT, greedy(4, logprobs=3, ignore_eos=True)))
    assert tokens_of(events) == ref[:4]
    for ev in events:
        assert ev.logprobs is not None
        (lp,) = ev.logprobs
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob < 0
