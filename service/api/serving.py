"""What the routes share: prompt checks, starting engine requests, streaming and collecting.

Everything that can fail at admission (an empty or too long prompt, a full
queue) fails here, before the route picks JSON or SSE, so that bad input is a
4xx and never a broken stream: ``Generation.start`` pulls the first event of
every engine request before any byte of the response is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from service.api.errors import APIError, bad_request
from service.engine.types import (
    EngineClient,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    TokenLogprob,
    Usage,
)
from service.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """The request limits in force: the settings, bounded by the loaded model."""

    context: int
    vocab_size: int
    max_prompt_tokens: int
    max_tokens: int
    default_max_tokens: int
    max_stop: int
    max_stop_length: int
    max_n: int
    max_prompts: int
    max_logprobs: int
    max_embed_batch: int

    @classmethod
    def build(cls, settings: Settings, context: int, vocab_size: int) -> Limits:
        prompt_cap = settings.max_prompt_tokens or context
        return cls(
            context=context,
            vocab_size=vocab_size,
            max_prompt_tokens=min(prompt_cap, context),
            max_tokens=settings.max_tokens_limit,
            default_max_tokens=settings.default_max_tokens,
            max_stop=settings.max_stop,
            max_stop_length=settings.max_stop_length,
            max_n=settings.max_n,
            max_prompts=settings.max_prompts,
            max_logprobs=settings.max_logprobs,
            max_embed_batch=settings.max_embed_batch,
        )


# -- checks ---------------------------------------------------------------------------


def check_stop(stop: Sequence[str], limits: Limits) -> None:
    if len(stop) > limits.max_stop:
        raise bad_request(
            f"at most {limits.max_stop} stop strings are allowed, got {len(stop)}", "stop"
        )
    for text in stop:
        if not text:
            raise bad_request("stop strings must not be empty", "stop")
        if len(text) > limits.max_stop_length:
            raise bad_request(
                f"stop strings may have at most {limits.max_stop_length} characters", "stop"
            )


def check_cap(value: int | None, cap: int, param: str) -> None:
    if value is not None and value > cap:
        raise bad_request(f"'{param}' may be at most {cap} on this server, got {value}", param)


async def prompt_ids(
    engine: EngineClient,
    limits: Limits,
    prompt: str | Sequence[int],
    param: str = "prompt",
    add_special_tokens: bool = True,
    truncate: int | None = None,
    parse_special: bool = False,
) -> list[int]:
    """The prompt as token ids within the server's prompt limit; text is tokenized off the
    event loop, special-token spellings as plain text unless ``parse_special``. The
    engine checks the ids themselves when the request reaches it.
    ``truncate``: keep only the last that many tokens (vLLM's truncate_prompt_tokens)."""
    if isinstance(prompt, str):
        ids = (
            await engine.encode(
                prompt, add_special_tokens=add_special_tokens, parse_special=parse_special
            )
            if prompt
            else []
        )
    else:
        ids = list(prompt)
    if truncate is not None and len(ids) > truncate:
        ids = ids[-truncate:]
    if not ids:
        raise bad_request("the prompt must not be empty", param, code="empty_prompt")
    if len(ids) > limits.max_prompt_tokens or len(ids) >= limits.context:
        raise bad_request(
            f"the prompt has {len(ids)} tokens, but this server accepts at most "
            f"{min(limits.max_prompt_tokens, limits.context - 1)} (the model's context is {limits.context} tokens)",
            param,
            code="context_length_exceeded",
        )
    return ids


def resolve_max_tokens(
    requested: int | None, prompt_tokens: int, limits: Limits, default: int | None
) -> int:
    """``requested`` checked against the server's cap; when omitted, ``default`` (None: the
    rest of the context). Whether prompt and max_tokens fit the context is the engine's check."""
    if requested is None:
        room = limits.context - prompt_tokens
        return max(1, min(default or limits.max_tokens, limits.max_tokens, room))
    check_cap(requested, limits.max_tokens, "max_tokens")
    return requested


# -- running engine requests ---------------------------------------------------------------


@dataclass
class Choice:
    """One finished sequence, accumulated from its events."""

    index: int
    prompt_tokens: int = 0
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, event: GenerateEvent) -> None:
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        self.text.append(event.text)
        self.token_ids.extend(event.token_ids)
        self.logprobs.extend(event.logprobs or [])
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.stop_reason = event.stop_reason
            self.usage = event.usage


class _Stream:
    """One engine request whose first event has arrived."""

    def __init__(self, engine: EngineClient, request: GenerateRequest, index: int) -> None:
        self.engine = engine
        self.request = request
        self.index = index
        self.iterator = engine.generate(request)
        self.first: GenerateEvent | None = None
        self.finished = False

    async def pull_first(self) -> None:
        self.first = await anext(self.iterator)
        self.finished = self.first.finish_reason is not None

    async def events(self) -> AsyncIterator[GenerateEvent]:
        if self.first is not None:
            yield self.first
        while not self.finished:
            event = await anext(self.iterator)
            self.finished = event.finish_reason is not None
            yield event

    async def close(self) -> None:
        if not self.finished:
            self.engine.abort(self.request.request_id)
            self.finished = True
        with contextlib.suppress(Exception):
            await self.iterator.aclose()


class Generation:
    """Engine requests (one per prompt and choice) started together and read as one."""

    def __init__(self, streams: list[_Stream]) -> None:
        self.streams = streams

    @classmethod
    async def start(cls, engine: EngineClient, requests: Sequence[GenerateRequest]) -> Generation:
        """Submits every request and waits for each first event; on any error none stays running."""
        streams: list[_Stream] = []
        try:
            # generate() may refuse at call time (queue full, draining): nothing may stay queued.
            for index, request in enumerate(requests):
                streams.append(_Stream(engine, request, index))
        except BaseException:
            await _close_all(streams)
            raise
        try:
            results = await asyncio.gather(
                *(s.pull_first() for s in streams), return_exceptions=True
            )
        except BaseException:  # cancelled (the client left): abort what was submitted
            await _close_all(streams)
            raise
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await _close_all(streams)
            raise failures[0]
        return cls(streams)

    async def events(self) -> AsyncIterator[tuple[int, GenerateEvent]]:
        """(choice index, event) in arrival order; closing it aborts what is unfinished."""
        try:
            if len(self.streams) == 1:
                async for event in self.streams[0].events():
                    yield 0, event
            else:
                async for item in _merge(self.streams):
                    yield item
        finally:
            await self.close()

    async def collect(self, prompt_tokens: Sequence[int]) -> list[Choice]:
        """Runs every request to its end; ``prompt_tokens[i]`` is choice i's prompt length."""
        choices = [
            Choice(index=i, prompt_tokens=prompt_tokens[i]) for i in range(len(self.streams))
        ]
        async for index, event in self.events():
            choices[index].add(event)
        return choices

    async def close(self) -> None:
        await _close_all(self.streams)


async def _close_all(streams: Sequence[_Stream]) -> None:
    for stream in streams:
        await asyncio.shield(stream.close())


async def _merge(streams: Sequence[_Stream]) -> AsyncIterator[tuple[int, GenerateEvent]]:
    queue: asyncio.Queue[tuple[int, GenerateEvent | None, BaseException | None]] = asyncio.Queue()

    async def pump(stream: _Stream) -> None:
        try:
            async for event in stream.events():
                await queue.put((stream.index, event, None))
        except Exception as exc:
            await queue.put((stream.index, None, exc))
        finally:
            await queue.put((stream.index, None, None))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            index, event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                remaining -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs ``work`` unless the client disconnects first; then cancels it and raises 499.

    Cancelling the work closes its engine requests, which aborts them: a
    non-streaming client that times out frees its KV cache within a step.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task in done:
        return task.result()
    raise APIError(499, "the client closed the connection", code="client_closed_request")


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
