"""Engine results in the OpenAI wire format: whole responses and streamed chunks."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.api.render import choice_usage, finite, token_bytes, token_text
from service.api.serving import Choice, Generation
from service.api.tools import ToolPlan, may_become_call, parse_tool_calls
from service.engine.types import GenerateEvent, TokenizerLike, TokenLogprob, Usage

UsageSink = Callable[[dict[str, Any]], None]


@dataclass
class Reply:
    """What every response and chunk of one request shares."""

    kind: str  # "text_completion" or "chat.completion"
    model: str
    tokenizer: TokenizerLike
    prompt_tokens: int  # each prompt counted once
    logprobs: bool
    include_usage: bool = False
    tools: ToolPlan | None = None  # chat with tools: replies may be tool calls
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "cmpl" if self.kind == "text_completion" else "chatcmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    def chunk(
        self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        kind = "text_completion" if self.kind == "text_completion" else "chat.completion.chunk"
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    def body(self, choices: list[dict[str, Any]], usages: Sequence[Usage]) -> dict[str, Any]:
        usage = total_usage(usages, self.prompt_tokens)
        return {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }


# -- logprobs and usage ------------------------------------------------------------------


def legacy_logprobs(
    tokenizer: TokenizerLike, logprobs: Sequence[TokenLogprob], offset: int = 0
) -> tuple[dict[str, Any], int]:
    """The /v1/completions form; ``offset`` is where this piece starts in the completion text."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        tokens.append(text)
        values.append(finite(lp.logprob))
        tops.append({token_text(tokenizer, t): finite(v) for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    body = {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
    return body, offset


def chat_logprobs(tokenizer: TokenizerLike, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": token_text(tokenizer, token_id),
            "logprob": finite(logprob),
            "bytes": token_bytes(tokenizer, token_id),
        }

    content = [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in logprobs
    ]
    return {"content": content}


def total_usage(usages: Sequence[Usage], prompt_tokens: int) -> dict[str, Any]:
    """OpenAI usage: each prompt counted once however many choices it had."""
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.cached_tokens for u in usages)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


# -- /v1/completions ---------------------------------------------------------------------


def completion_body(reply: Reply, choices: Sequence[Choice]) -> dict[str, Any]:
    rendered = []
    for choice in choices:
        logprobs = legacy_logprobs(reply.tokenizer, choice.logprobs)[0] if reply.logprobs else None
        text = "".join(choice.text)
        rendered.append(
            {
                "index": choice.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
            }
        )
    return reply.body(rendered, [choice_usage(c) for c in choices])


def completion_chunks(
    reply: Reply, generation: Generation, on_usage: UsageSink
) -> AsyncIterator[dict[str, Any]]:
    offsets: dict[int, int] = {}

    def choice(index: int, event: GenerateEvent) -> dict[str, Any]:
        logprobs = None
        if reply.logprobs:
            logprobs, offsets[index] = legacy_logprobs(
                reply.tokenizer, event.logprobs or [], offsets.get(index, 0)
            )
        return {
            "index": index,
            "text": event.text,
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }

    return _chunks(reply, generation, on_usage, choice)


# -- /v1/chat/completions ------------------------------------------------------------------


def chat_body(reply: Reply, choices: Sequence[Choice]) -> dict[str, Any]:
    rendered = []
    for choice in choices:
        logprobs = chat_logprobs(reply.tokenizer, choice.logprobs) if reply.logprobs else None
        text = "".join(choice.text)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish: str | None = choice.finish_reason
        calls = _calls(reply, text, finish)
        if calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls"
        rendered.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        )
    return reply.body(rendered, [choice_usage(c) for c in choices])


def chat_chunks(
    reply: Reply, generation: Generation, on_usage: UsageSink
) -> AsyncIterator[dict[str, Any]]:
    def choice(index: int, event: GenerateEvent) -> dict[str, Any]:
        logprobs = chat_logprobs(reply.tokenizer, event.logprobs or []) if reply.logprobs else None
        return {
            "index": index,
            "delta": {"content": event.text} if event.text else {},
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }

    if reply.tools is not None:
        choice = _ToolStream(reply, choice).choice

    roles = [
        reply.chunk(
            [
                {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
        for index in range(len(generation.streams))
    ]
    return _chunks(reply, generation, on_usage, choice, first=roles)


async def _chunks(
    reply: Reply,
    generation: Generation,
    on_usage: UsageSink,
    choice: Callable[[int, GenerateEvent], dict[str, Any]],
    first: Sequence[dict[str, Any]] = (),
) -> AsyncIterator[dict[str, Any]]:
    """``first``, then one chunk per event with something to show, then the usage."""
    for chunk in first:
        yield chunk
    usages: dict[int, Usage] = {}
    async for index, event in generation.events():
        if not event.text and event.finish_reason is None and not event.logprobs:
            continue  # a held-back piece: nothing to show yet
        if event.usage is not None:
            usages[index] = event.usage
        rendered = choice(index, event)
        if rendered:
            yield reply.chunk([rendered])
    usage = total_usage(list(usages.values()), reply.prompt_tokens)
    on_usage(usage)
    if reply.include_usage:
        yield reply.chunk([], usage)


def _calls(reply: Reply, text: str, finish: str | None) -> list[dict[str, Any]] | None:
    """The tool calls a finished reply makes, if it is calls (a cut-off one is text)."""
    if reply.tools is None or finish != "stop":
        return None
    return parse_tool_calls(text, reply.tools)


class _ToolStream:
    """Streamed chat with tools: text that may be tool calls is held back until it is known;
    calls are sent as OpenAI's tool-call deltas (a first with id and name, then arguments)."""

    def __init__(self, reply: Reply, plain: Callable[[int, GenerateEvent], dict[str, Any]]) -> None:
        self.reply = reply
        self.plain = plain
        self.held: dict[int, list[str]] = {}  # per choice: text held back
        self.released: set[int] = set()  # choices known to be text

    def choice(self, index: int, event: GenerateEvent) -> dict[str, Any]:
        if index in self.released:
            return self.plain(index, event)
        held = self.held.setdefault(index, [])
        held.append(event.text)
        text = "".join(held)
        if event.finish_reason is None:
            if self.reply.tools is not None and (self.reply.tools.forced or may_become_call(text)):
                return {}  # still undecided: show nothing yet
            self.released.add(index)
            return self.plain(index, _with_text(event, text))
        calls = _calls(self.reply, text, event.finish_reason)
        if calls is None:
            self.released.add(index)
            return self.plain(index, _with_text(event, text))
        deltas = [
            {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                },
            }
            for i, call in enumerate(calls)
        ]
        return {
            "index": index,
            "delta": {"tool_calls": deltas},
            "logprobs": None,
            "finish_reason": "tool_calls",
        }


def _with_text(event: GenerateEvent, text: str) -> GenerateEvent:
    return GenerateEvent(
        event.request_id,
        event.token_ids,
        text,
        event.logprobs,
        event.finish_reason,
        event.stop_reason,
        event.usage,
    )


# -- /v1/embeddings ------------------------------------------------------------------------


def embedding_data(embeddings: Sequence[Sequence[float]], encoding: str) -> list[dict[str, Any]]:
    """Float lists, or base64 of little-endian float32 (what the official client decodes)."""
    data = []
    for index, vector in enumerate(embeddings):
        value: list[float] | str = list(vector)
        if encoding == "base64":
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": value})
    return data
