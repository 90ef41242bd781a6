"""Engine results in the OpenAI wire format: whole responses and streamed chunks."""

from __future__ import annotations

import base64
import dataclasses
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
class PromptView:
    """One choice's prompt: its ids, and its text as echoed."""

    ids: list[int]
    text: str


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
    # -- what other servers' clients ask for (see schemas/dialects.py) --
    continuous_usage: bool = False  # usage so far on every chunk
    return_token_ids: bool = False
    echo: bool = False
    drop_generated: bool = False  # max_tokens 0 with echo: the one token drawn is not shown
    num_logprobs: int = 0  # top-n of the legacy form (echoed prompt tokens)
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs field
    prompts: Sequence[PromptView] = ()  # per choice, for echo and prompt token ids
    chat_echo: str = ""  # chat echo: the final assistant message the reply continues
    include_stop_str: bool = False  # a matched stop string ends the text (vLLM)

    def tail(self, finish_reason: str | None, stop_reason: str | int | None) -> str:
        """The matched stop string when the client wants it in the text."""
        if self.include_stop_str and finish_reason == "stop" and isinstance(stop_reason, str):
            return stop_reason
        return ""

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
    tokenizer: TokenizerLike,
    logprobs: Sequence[TokenLogprob | None],
    offset: int = 0,
    top_n: int | None = None,
    prompt_ids: Sequence[int] = (),
) -> tuple[dict[str, Any], int]:
    """The /v1/completions form; ``offset`` is where this piece starts in the completion text.
    As OpenAI and vLLM answer, each token's top logprobs hold the top n and the token itself
    (up to n + 1 entries). A None entry (the first echoed prompt token) is ``prompt_ids[0]``."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for lp in logprobs:
        if lp is None:
            text = token_text(tokenizer, prompt_ids[0])
            values.append(None)
            tops.append(None)
        else:
            text = token_text(tokenizer, lp.token_id)
            values.append(finite(lp.logprob))
            top = lp.top if top_n is None else lp.top[:top_n]
            entries = {token_text(tokenizer, t): finite(v) for t, v in top}
            entries.setdefault(text, finite(lp.logprob))
            tops.append(entries)
        tokens.append(text)
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


def vllm_prompt_logprobs(
    tokenizer: TokenizerLike, entries: Sequence[TokenLogprob | None] | None
) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or {token id: {logprob,
    rank, decoded_token}} holding the token itself and the top n."""
    if entries is None:
        return None
    out: list[dict[str, Any] | None] = []
    for lp in entries:
        if lp is None:
            out.append(None)
            continue
        item = {
            str(t): {"logprob": finite(v), "rank": rank, "decoded_token": token_text(tokenizer, t)}
            for rank, (t, v) in enumerate(lp.top, start=1)
        }
        item.setdefault(
            str(lp.token_id),
            {
                "logprob": finite(lp.logprob),
                "rank": lp.rank,
                "decoded_token": token_text(tokenizer, lp.token_id),
            },
        )
        out.append(item)
    return out


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
        prompt = reply.prompts[choice.index] if reply.prompts else PromptView([], "")
        head, lps = _echo_part(reply, choice.prompt_logprobs, prompt)
        logprobs = None
        if reply.logprobs:
            logprobs, _ = legacy_logprobs(
                reply.tokenizer, [*lps, *choice.logprobs], 0, prompt_ids=prompt.ids
            )
        rendered.append(
            {
                "index": choice.index,
                "text": head
                + "".join(choice.text)
                + reply.tail(choice.finish_reason, choice.stop_reason),
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
                **_extras(reply, choice, prompt),
            }
        )
    return reply.body(rendered, [choice_usage(c) for c in choices])


def _echo_part(
    reply: Reply, entries: Sequence[TokenLogprob | None] | None, prompt: PromptView
) -> tuple[str, list[TokenLogprob | None]]:
    """With echo: the prompt text and its legacy logprob entries (top n cut to ``logprobs``)."""
    if not reply.echo:
        return "", []
    lps: list[TokenLogprob | None] = list(entries or []) if reply.logprobs else []
    trimmed: list[TokenLogprob | None] = [
        None
        if lp is None
        else TokenLogprob(lp.token_id, lp.logprob, lp.top[: reply.num_logprobs], lp.rank)
        for lp in lps
    ]
    return prompt.text, trimmed


def _extras(reply: Reply, choice: Choice, prompt: PromptView) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if reply.prompt_logprobs:
        out["prompt_logprobs"] = vllm_prompt_logprobs(reply.tokenizer, choice.prompt_logprobs)
    if reply.return_token_ids:
        out["prompt_token_ids"] = prompt.ids
        out["token_ids"] = choice.token_ids
    return out


def drop_generated(choices: Sequence[Choice]) -> None:
    """max_tokens 0: the token drawn with the prompt's logits is not part of the answer."""
    for choice in choices:
        choice.text, choice.token_ids, choice.logprobs = [], [], []
        choice.finish_reason, choice.stop_reason = "length", None
        if choice.usage is not None:
            choice.usage = Usage(choice.usage.prompt_tokens, 0, choice.usage.cached_tokens)


def best_choices(choices: Sequence[Choice], n: int, per_prompt: int) -> list[Choice]:
    """best_of: per prompt, the n candidates of highest total logprob, renumbered."""
    kept: list[Choice] = []
    for start in range(0, len(choices), per_prompt):
        group = list(choices[start : start + per_prompt])
        group.sort(key=lambda c: -sum(lp.logprob for lp in c.logprobs))
        kept.extend(group[:n])
    for index, choice in enumerate(kept):
        choice.index = index
    return kept


def completion_chunks(
    reply: Reply, generation: Generation, on_usage: UsageSink
) -> AsyncIterator[dict[str, Any]]:
    offsets: dict[int, int] = {}
    started: set[int] = set()

    def choice(index: int, event: GenerateEvent) -> dict[str, Any]:
        first = index not in started
        started.add(index)
        prompt = reply.prompts[index] if reply.prompts else PromptView([], "")
        head, lps = _echo_part(reply, event.prompt_logprobs, prompt) if first else ("", [])
        text = (
            ""
            if reply.drop_generated
            else event.text + reply.tail(event.finish_reason, event.stop_reason)
        )
        generated = [] if reply.drop_generated else (event.logprobs or [])
        logprobs = None
        if reply.logprobs:
            logprobs, offsets[index] = legacy_logprobs(
                reply.tokenizer, [*lps, *generated], offsets.get(index, 0), prompt_ids=prompt.ids
            )
        out: dict[str, Any] = {
            "index": index,
            "text": head + text,
            "logprobs": logprobs,
            "finish_reason": "length" if reply.drop_generated else event.finish_reason,
        }
        if first and reply.prompt_logprobs:
            out["prompt_logprobs"] = vllm_prompt_logprobs(reply.tokenizer, event.prompt_logprobs)
        if reply.return_token_ids:
            if first:
                out["prompt_token_ids"] = prompt.ids
            out["token_ids"] = [] if reply.drop_generated else event.token_ids
        return out

    return _chunks(reply, generation, on_usage, choice)


# -- /v1/chat/completions ------------------------------------------------------------------


def chat_body(reply: Reply, choices: Sequence[Choice]) -> dict[str, Any]:
    rendered = []
    for choice in choices:
        logprobs = chat_logprobs(reply.tokenizer, choice.logprobs) if reply.logprobs else None
        text = "".join(choice.text) + reply.tail(choice.finish_reason, choice.stop_reason)
        message: dict[str, Any] = {"role": "assistant", "content": reply.chat_echo + text}
        finish: str | None = choice.finish_reason
        calls = _calls(reply, "".join(choice.text), finish)
        if calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls"
        item: dict[str, Any] = {
            "index": choice.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": choice.stop_reason,
        }
        if reply.return_token_ids:
            item["token_ids"] = choice.token_ids
        rendered.append(item)
    body = reply.body(rendered, [choice_usage(c) for c in choices])
    if reply.prompt_logprobs and choices:
        body["prompt_logprobs"] = vllm_prompt_logprobs(reply.tokenizer, choices[0].prompt_logprobs)
    if reply.return_token_ids and reply.prompts:
        body["prompt_token_ids"] = reply.prompts[0].ids
    return body


def chat_chunks(
    reply: Reply, generation: Generation, on_usage: UsageSink
) -> AsyncIterator[dict[str, Any]]:
    def choice(index: int, event: GenerateEvent) -> dict[str, Any]:
        logprobs = chat_logprobs(reply.tokenizer, event.logprobs or []) if reply.logprobs else None
        text = event.text + reply.tail(event.finish_reason, event.stop_reason)
        out = {
            "index": index,
            "delta": {"content": text} if text else {},
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }
        if reply.return_token_ids:
            out["token_ids"] = event.token_ids
        return out

    if reply.tools is not None:
        choice = _ToolStream(reply, choice).choice

    def role(index: int) -> dict[str, Any]:
        chunk = reply.chunk(
            [
                {
                    "index": index,
                    "delta": {"role": "assistant", "content": reply.chat_echo},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            _usage_so_far(reply, 0) if reply.continuous_usage else None,
        )
        if reply.return_token_ids and reply.prompts and index == 0:
            chunk["prompt_token_ids"] = reply.prompts[0].ids
        return chunk

    roles = [role(index) for index in range(len(generation.streams))]
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
    produced: dict[int, int] = {}
    async for index, event in generation.events():
        produced[index] = produced.get(index, 0) + len(event.token_ids)
        if event.usage is not None:
            usage_of = event.usage
            if reply.drop_generated:
                usage_of = Usage(usage_of.prompt_tokens, 0, usage_of.cached_tokens)
            usages[index] = usage_of
        if not event.text and event.finish_reason is None and not event.logprobs:
            continue  # a held-back piece: nothing to show yet
        rendered = choice(index, event)
        if rendered:
            so_far = None
            if reply.continuous_usage:
                so_far = _usage_so_far(reply, 0 if reply.drop_generated else produced[index])
            yield reply.chunk([rendered], so_far)
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
    return dataclasses.replace(event, text=text)


def _usage_so_far(reply: Reply, completion_tokens: int) -> dict[str, Any]:
    """vLLM's continuous usage stats: the prompt and this choice's tokens so far."""
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": reply.prompt_tokens + completion_tokens,
    }


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
