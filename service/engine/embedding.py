"""Embedding requests: validated token lists, run by the engine thread between steps."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.engine.request import check_token_ids
from service.engine.types import BadRequest, ContextLengthExceeded, Pooling


@dataclass(eq=False)
class EmbedJob:
    inputs: list[list[int]]
    pooling: Pooling
    normalize: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[list[float]]]
    results: list[list[float]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.inputs)

    def next_inputs(self, budget: int) -> list[list[int]]:
        """The next inputs that fit ``budget`` tokens (at least one, however long)."""
        start = len(self.results)
        take = [self.inputs[start]]
        used = len(take[0])
        for ids in self.inputs[start + 1 :]:
            if used + len(ids) > budget:
                break
            take.append(ids)
            used += len(ids)
        return take

    def resolve(self, value: Any) -> None:
        """Thread-safe: hand a result or an exception to the awaiting coroutine."""
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future, value)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting
            pass


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if future.done():  # the caller went away
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def tokenize_inputs(
    tokenizer: Any, inputs: Sequence[str | Sequence[int]], vocab_size: int, max_len: int
) -> list[list[int]]:
    """Token ids of every input; raises ``RequestError`` for empty, out-of-vocabulary
    or too long inputs."""
    if not inputs:
        raise BadRequest("input must not be empty", param="input")
    out = []
    for x in inputs:
        ids = tokenizer.encode(x) if isinstance(x, str) else list(x)
        if not ids:
            raise BadRequest("an input must not be empty", param="input")
        check_token_ids(ids, vocab_size, "input")
        if len(ids) > max_len:
            raise ContextLengthExceeded(len(ids), 0, max_len)
        out.append(ids)
    return out
