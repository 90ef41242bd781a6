"""gptserve's engine without HTTP: the same client-side timing as the load generator.

Each engine event that carries tokens counts as a content chunk, so TTFT,
ITL, TPOT and throughput mean exactly what they mean over HTTP and the two
can be compared side by side.

``python -m bench.engine_bench`` runs the suite's engine scenario in a fresh
process (``Engine.from_pretrained`` then ``start``, as a user of the engine
would) and prints JSON: the benchmark's own use of torch in its main process
must not change what the engine measures (two threads running torch in one
process slow each other down on a two-core machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.metrics import RequestRecord, Summary, summarize
from bench.prompts import prompt_ids
from model.registry import DEFAULT_MODEL
from service.engine.engine import Engine
from service.engine.types import GenerateRequest, SamplingParams

log = logging.getLogger("bench.engine_bench")


async def stream(engine: Engine, prompt: list[int], max_tokens: int) -> RequestRecord:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    record = RequestRecord(send_time=time.perf_counter(), prompt_len=len(prompt))
    try:
        async for event in engine.generate(GenerateRequest(list(prompt), params)):
            if event.token_ids:
                record.chunk_times.append(time.perf_counter())
            if event.usage is not None:
                record.output_tokens = event.usage.completion_tokens
                record.prompt_tokens = event.usage.prompt_tokens
    except Exception as exc:  # recorded as a failed request, like the HTTP client does
        record.error = f"{type(exc).__name__}: {exc}"
    record.end_time = time.perf_counter()
    return record


async def _closed_loop(
    engine: Engine, prompts: Sequence[list[int]], max_tokens: int, concurrency: int
) -> list[RequestRecord]:
    gate = asyncio.Semaphore(concurrency)

    async def one(ids: list[int]) -> RequestRecord:
        async with gate:
            return await stream(engine, ids, max_tokens)

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def run_streams(
    engine: Engine, prompts: Sequence[list[int]], max_tokens: int, concurrency: int
) -> tuple[Summary, list[RequestRecord]]:
    """All prompts through the engine, ``concurrency`` at a time."""
    records = asyncio.run(_closed_loop(engine, prompts, max_tokens, concurrency))
    summary = summarize(records)
    if summary.failed:
        raise RuntimeError(f"{summary.failed} engine requests failed: {summary.errors}")
    return summary, records


def prefix_ttfts(engine: Engine, prefix: list[int], suffixes: Sequence[list[int]]) -> list[float]:
    """TTFT (s) of one-token requests sent one after another, all starting with ``prefix``."""

    async def go() -> list[float]:
        out = []
        for suffix in suffixes:
            record = await stream(engine, prefix + suffix, max_tokens=1)
            if not record.ok:
                raise RuntimeError(f"prefix request failed: {record.error}")
            out.append(record.ttft)
        return out

    return asyncio.run(go())


def scenario(engine: Engine, ids: Any, args: argparse.Namespace) -> dict[str, list[float]]:
    """1 stream and 16 streams, repeated and interleaved, plus the prefix-cache TTFTs.

    ``ids(n, offset)`` gives n corpus tokens; every request gets its own offset
    so that no prompt is served from the prefix cache by accident.
    """
    out: dict[str, list[float]] = {
        k: []
        for k in ("tps_1", "tps_16", "ttft_ms", "tpot_ms", "prefix_first_ms", "prefix_second_ms")
    }
    offset = 0
    for rep in range(args.reps):
        log.info("engine rep %d", rep + 1)
        single, _ = run_streams(engine, [ids(args.prompt_len, offset)], args.new_tokens, 1)
        out["tps_1"].append(single.output_throughput)
        out["ttft_ms"].append(single.ttft_ms.median)
        out["tpot_ms"].append(single.tpot_ms.median)
        offset += args.prompt_len
        if rep < 2:  # 16 streams take long on a CPU: two runs
            prompts = [ids(args.prompt_len, offset + 7 * i) for i in range(16)]
            many, _ = run_streams(engine, prompts, args.new_tokens, 16)
            out["tps_16"].append(many.output_throughput)
            offset += 131
        prefix = ids(args.prefix_len, 300 * (rep + 1))
        suffixes = [ids(16, 5000 + 100 * (2 * rep + i)) for i in range(2)]
        first, second = prefix_ttfts(engine, prefix, suffixes)
        out["prefix_first_ms"].append(1000 * first)
        out["prefix_second_ms"].append(1000 * second)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    start = time.perf_counter()
    engine = Engine.from_pretrained(args.model, device="cpu")
    engine.start()
    ready = time.perf_counter() - start
    try:
        out: dict[str, Any] = scenario(
            engine, lambda n, off: prompt_ids(engine.tokenizer, n, off), args
        )
    finally:
        asyncio.run(engine.stop(drain_timeout=5.0))
    out["ready_s"] = ready
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
