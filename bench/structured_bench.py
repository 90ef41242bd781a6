"""Constrained decoding cost on the engine: per-token time of JSON-schema-constrained streams
against unconstrained ones at batch 1 and 16, and compile time of the test schemas.

``python -m bench.structured_bench`` runs in a fresh process (as ``bench.engine_bench``
does) and prints one JSON object. Both sides decode greedily from the same prompts;
a constrained stream ends when its JSON is complete, so the figure compared is the
time per output token after the first (TPOT), not the total time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from typing import Any

from bench.metrics import RequestRecord
from bench.prompts import prompt_ids
from bench.structured_schemas import SCHEMAS
from model.registry import DEFAULT_MODEL
from service.engine.engine import Engine
from service.engine.types import Constraint, GenerateRequest, SamplingParams

log = logging.getLogger("bench.structured_bench")

# Long enough outputs: an array of 8 bounded strings and 8 objects.
LONG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "names": {
            "type": "array",
            "items": {"type": "string", "maxLength": 16},
            "minItems": 8,
            "maxItems": 8,
        },
        "people": {
            "type": "array",
            "items": SCHEMAS["person"],
            "minItems": 8,
            "maxItems": 8,
        },
    },
    "required": ["names", "people"],
    "additionalProperties": False,
}


async def _stream(engine: Engine, prompt: list[int], params: SamplingParams) -> RequestRecord:
    record = RequestRecord(send_time=time.perf_counter(), prompt_len=len(prompt))
    async for event in engine.generate(GenerateRequest(list(prompt), params)):
        if event.token_ids:
            record.chunk_times.append(time.perf_counter())
        if event.usage is not None:
            record.output_tokens = event.usage.completion_tokens
    record.end_time = time.perf_counter()
    return record


def _tpot_ms(records: list[RequestRecord]) -> float:
    """Mean time per output token after the first, over the requests, in ms."""
    values = [
        (r.chunk_times[-1] - r.chunk_times[0]) / (len(r.chunk_times) - 1) * 1e3
        for r in records
        if len(r.chunk_times) > 1
    ]
    return statistics.mean(values)


async def _batch(engine: Engine, n: int, constrained: bool, tokens: int) -> list[RequestRecord]:
    constraint = Constraint("json_schema", json.dumps(LONG_SCHEMA)) if constrained else None
    params = [
        SamplingParams(
            max_tokens=tokens,
            temperature=0.0 if i == 0 else 1.0,
            seed=i,
            ignore_eos=not constrained,
            constraint=constraint,
        )
        for i in range(n)
    ]
    prompts = [prompt_ids(engine.tokenizer, 32, offset=i) for i in range(n)]
    return list(
        await asyncio.gather(*(_stream(engine, p, s) for p, s in zip(prompts, params, strict=True)))
    )


def compile_times(engine: Engine, reps: int) -> dict[str, Any]:
    """Milliseconds per compile of each test schema (no cache), over ``reps`` rounds."""
    engine.grammars.lltokenizer()  # the one-time tokenizer setup is not a compile
    times: list[float] = []
    per_schema: dict[str, float] = {}
    for name, schema in SCHEMAS.items():
        mine = []
        for _ in range(reps):
            start = time.perf_counter()
            engine.grammars.compile_now(Constraint("json_schema", json.dumps(schema)))
            mine.append((time.perf_counter() - start) * 1e3)
        per_schema[name] = round(statistics.median(mine), 3)
        times.extend(mine)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
        "max_ms": round(times[-1], 3),
        "per_schema_median_ms": per_schema,
        "samples": len(times),
    }


async def run(model: str, tokens: int, reps: int) -> dict[str, Any]:
    engine = Engine.from_pretrained(model, device="cpu")
    engine.start()
    try:
        out: dict[str, Any] = {"compile": compile_times(engine, 20)}
        await _batch(engine, 2, True, 16)  # warm both paths
        await _batch(engine, 2, False, 16)
        for n in (1, 16):
            plain, constrained = [], []
            for _ in range(reps):  # interleaved, so noise hits both sides alike
                plain.append(_tpot_ms(await _batch(engine, n, False, tokens)))
                constrained.append(_tpot_ms(await _batch(engine, n, True, tokens)))
            p, c = statistics.median(plain), statistics.median(constrained)
            out[f"batch{n}"] = {
                "unconstrained_tpot_ms": round(p, 3),
                "constrained_tpot_ms": round(c, 3),
                "overhead_pct": round((c / p - 1) * 100, 1),
                "reps": reps,
            }
        return out
    finally:
        await engine.stop(5.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(run(args.model, args.tokens, args.reps))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
