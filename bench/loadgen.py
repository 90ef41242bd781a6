"""Load generator for any OpenAI-compatible ``/v1/completions`` endpoint.

Every request streams (SSE) with ``stream_options.include_usage`` so the
server reports how many tokens it generated, asks for greedy decoding and a
fixed output length (``max_tokens`` with ``ignore_eos``). Two ways to offer
load, as vLLM's ``bench serve`` does:

- closed loop: ``max_concurrency`` requests in flight, each new one sent when
  one finishes (``request_rate`` infinite);
- open loop: arrivals at ``request_rate`` per second with gamma-distributed
  gaps (``burstiness`` 1 is a Poisson process, below 1 burstier), optionally
  capped by ``max_concurrency``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from bench.metrics import RequestRecord, span
from bench.sse import SSEParser, classify


@dataclass
class Prompt:
    """A prompt as text or token ids, with its length in tokens."""

    prompt: str | list[int]
    num_tokens: int


@dataclass
class LoadSpec:
    base_url: str  # e.g. http://127.0.0.1:8000 (the /v1/completions path is appended)
    model: str
    prompts: Sequence[Prompt]  # one request per prompt, in order
    output_len: int
    max_concurrency: int | None = None  # None: no client-side cap
    request_rate: float = math.inf  # requests/s; inf sends as fast as the cap allows
    burstiness: float = 1.0
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    label: str = "requests"


@dataclass
class LoadResult:
    records: list[RequestRecord]
    duration_s: float  # first send to last completion
    wall_start: float  # time.time() at the first send, for the results file


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of ``n`` requests at ``rate`` per second.

    Gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate,
    exponential (Poisson arrivals) at burstiness 1. The schedule is rescaled so
    the last request goes out at n/rate, which keeps the offered rate exact for
    small n. An infinite rate sends everything at once.
    """
    if n <= 0:
        return []
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be positive, got {rate} and {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    return [float(t) for t in times * ((n / rate) / times[-1])]


def completion_payload(spec: LoadSpec, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model,
        "prompt": prompt.prompt,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.ignore_eos:
        body["ignore_eos"] = True
    body.update(spec.extra_body)
    return body


async def stream_completion(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    prompt_len: int,
    headers: dict[str, str],
) -> RequestRecord:
    """Send one streaming completion and time its chunks."""
    record = RequestRecord(send_time=time.perf_counter(), prompt_len=prompt_len)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode("utf-8", "replace")[:300]
                record.error = f"HTTP {resp.status_code}: {detail}"
            else:
                await _read_stream(resp, record)
    except Exception as exc:  # a benchmark records every failure and carries on
        record.error = f"{type(exc).__name__}: {exc}"
    record.end_time = time.perf_counter()
    return record


async def _read_stream(resp: httpx.Response, record: RequestRecord) -> None:
    parser = SSEParser()
    parts: list[str] = []
    async for text in resp.aiter_text():
        for data in parser.feed(text):
            chunk = classify(data)
            if chunk.kind == "content":
                record.chunk_times.append(time.perf_counter())
                parts.append(chunk.text)
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.get("completion_tokens")
                record.prompt_tokens = chunk.usage.get("prompt_tokens")
            if chunk.kind == "error":
                record.error = chunk.error
    record.text = "".join(parts)


async def run_load(spec: LoadSpec) -> LoadResult:
    """Offer the load the spec describes; one record per prompt, in prompt order."""
    url = spec.base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    offsets = arrival_offsets(len(spec.prompts), spec.request_rate, spec.burstiness, spec.seed)
    gate = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    cap = spec.max_concurrency or len(spec.prompts)
    limits = httpx.Limits(max_connections=cap + 4, max_keepalive_connections=cap + 4)
    timeout = httpx.Timeout(spec.timeout_s, connect=30.0)
    bar = tqdm(total=len(spec.prompts), desc=spec.label, disable=not spec.progress, leave=False)
    wall_start = time.time()
    start = time.perf_counter()

    async def one(prompt: Prompt, offset: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        body = completion_payload(spec, prompt)
        if gate is None:
            record = await stream_completion(client, url, body, prompt.num_tokens, headers)
        else:
            async with gate:  # the send time is taken after the wait, as vLLM does
                record = await stream_completion(client, url, body, prompt.num_tokens, headers)
        bar.update(1)
        return record

    try:
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            tasks = [one(p, off) for p, off in zip(spec.prompts, offsets, strict=True)]
            records = list(await asyncio.gather(*tasks))
    finally:
        bar.close()
    return LoadResult(records=records, duration_s=span(records), wall_start=wall_start)


def run(spec: LoadSpec) -> LoadResult:
    """Synchronous wrapper around ``run_load``."""
    return asyncio.run(run_load(spec))
