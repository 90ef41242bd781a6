"""The Responses API: ``POST /v1/responses``, whole or streamed with its typed events.

Enough for the official SDK's ``client.responses.create`` and ``client.responses.stream``:
one assistant message with one ``output_text`` part. Nothing is stored: ``store`` is
ignored and ``previous_response_id`` refused.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from service.api.errors import ERROR_RESPONSES
from service.api.routes.common import log_prompt, record_tokens, render_messages
from service.api.routes.openai import check_model
from service.api.runtime import ServedDep
from service.api.schemas.responses import ResponsesBody
from service.api.serving import Generation, prompt_ids, resolve_max_tokens, until_disconnect
from service.api.sse import SSE_RESPONSE, SSEResponse, named_event_stream
from service.engine.types import GenerateRequest, SamplingParams, Usage

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)


class _Response:
    """The response object as it grows."""

    def __init__(self, body: ResponsesBody, model: str) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.body = body
        self.model = model

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [_text_part(text)]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def object(
        self, status: str, output: list[dict[str, Any]], usage: Usage | None, reason: str | None
    ) -> dict[str, Any]:
        b = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": b.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "top_p": b.top_p,
            "truncation": "disabled",
            "usage": _usage(usage) if usage is not None else None,
            "user": b.user,
            "metadata": b.metadata or {},
        }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _status(reason: str | None) -> str:
    return "incomplete" if reason == "length" else "completed"


@router.post("/responses", responses=SSE_RESPONSE)
async def create_response(body: ResponsesBody, request: Request, ctx: ServedDep) -> Any:
    check_model(body.model, ctx)
    body.check()
    text, rendered = await render_messages(ctx, body.messages())
    log_prompt(request, ctx, text)
    ids = await prompt_ids(ctx.engine, ctx.limits, rendered, "input")
    max_tokens = resolve_max_tokens(body.max_output_tokens, len(ids), ctx.limits, None)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed
    )
    generation = await until_disconnect(
        request, Generation.start(ctx.engine, [GenerateRequest(ids, params)])
    )
    reply = _Response(body, ctx.settings.model_name)
    if body.stream:
        return SSEResponse(
            _events(request, reply, generation),
            on_close=generation.close,
            encode=named_event_stream,
        )
    [choice] = await until_disconnect(request, generation.collect([len(ids)]))
    usage = choice.usage or Usage(len(ids), len(choice.token_ids))
    record_tokens(request, usage.prompt_tokens, usage.completion_tokens)
    status = _status(choice.finish_reason)
    output = [reply.message("".join(choice.text), "completed")]
    return reply.object(status, output, usage, choice.finish_reason)


async def _events(
    request: Request, reply: _Response, generation: Generation
) -> AsyncIterator[dict[str, Any]]:
    sequence = 0

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        nonlocal sequence
        sequence += 1
        return {"type": kind, "sequence_number": sequence - 1, **fields}

    where = {"item_id": reply.message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=reply.object("in_progress", [], None, None))
    yield event("response.in_progress", response=reply.object("in_progress", [], None, None))
    yield event("response.output_item.added", output_index=0, item=reply.message("", "in_progress"))
    yield event("response.content_part.added", **where, part=_text_part(""))
    pieces: list[str] = []
    usage: Usage | None = None
    reason: str | None = None
    async for _, ev in generation.events():
        if ev.text:
            pieces.append(ev.text)
            yield event("response.output_text.delta", **where, delta=ev.text, logprobs=[])
        if ev.finish_reason is not None:
            usage, reason = ev.usage, ev.finish_reason
    text = "".join(pieces)
    if usage is not None:
        record_tokens(request, usage.prompt_tokens, usage.completion_tokens)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=_text_part(text))
    item = reply.message(text, "completed")
    yield event("response.output_item.done", output_index=0, item=item)
    status = _status(reason)
    kind = "response.completed" if status == "completed" else "response.incomplete"
    yield event(kind, response=reply.object(status, [item], usage, reason))
