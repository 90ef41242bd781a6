"""Native routes: /generate (JSON or SSE), /embed, /tokenize, /detokenize."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request

from service.api.errors import ERROR_RESPONSES
from service.api.middleware import scope_state
from service.api.render import choice_usage, native_logprobs
from service.api.runtime import Served, ServedDep
from service.api.schemas.native import (
    DetokenizeBody,
    DetokenizeOut,
    EmbedBody,
    EmbedOut,
    EmbedUsage,
    GenerateBody,
    GenerateOut,
    TokenizeBody,
    TokenizeOut,
)
from service.api.serving import (
    Choice,
    Generation,
    check_cap,
    check_token_ids,
    prompt_ids,
    resolve_max_tokens,
    until_disconnect,
)
from service.api.sse import SSEResponse
from service.engine.types import EmbedResult, GenerateEvent, GenerateRequest, Pooling, Usage

logger = logging.getLogger(__name__)
router = APIRouter(tags=["native"], responses=ERROR_RESPONSES)

# Each Server-Sent Event: ``data`` is a JSON payload, or "[DONE]" after the last one.
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
    },
    "required": ["data"],
}
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        "description": "JSON, or Server-Sent Events with `stream: true`",
    }
}


@router.post(
    "/generate",
    response_model=GenerateOut,
    response_model_exclude_none=True,
    responses=SSE_RESPONSE,
)
async def generate(body: GenerateBody, request: Request, ctx: ServedDep) -> Any:
    """Generate text for one prompt; ``"stream": true`` answers with Server-Sent Events."""
    body.check(ctx.limits)
    ids = await prompt_ids(ctx.engine, ctx.limits, body.prompt)
    max_tokens = resolve_max_tokens(
        body.max_tokens, len(ids), ctx.limits, ctx.limits.default_max_tokens
    )
    log_prompt(request, ctx, body.prompt)
    engine_request = GenerateRequest(ids, body.to_sampling_params(max_tokens))
    generation = await until_disconnect(request, Generation.start(ctx.engine, [engine_request]))
    response_id = f"gen-{engine_request.request_id}"
    if body.stream:
        return SSEResponse(
            _native_events(request, ctx, body, generation, response_id), on_close=generation.close
        )
    [choice] = await until_disconnect(request, generation.collect([len(ids)]))
    return _native_result(request, ctx, body, choice, response_id)


@router.post("/embed", response_model=EmbedOut)
async def embed(body: EmbedBody, request: Request, ctx: ServedDep) -> EmbedOut:
    """Embeddings of one text or a batch (mean or last-token pooling of the final hidden states)."""
    result = await run_embed(request, ctx, body.texts(), body.pooling, body.normalize)
    record_tokens(request, result.prompt_tokens, 0)
    usage = EmbedUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return EmbedOut(embeddings=result.embeddings, dim=embedding_dim(result), usage=usage)


@router.post("/tokenize", response_model=TokenizeOut)
async def tokenize(body: TokenizeBody, ctx: ServedDep) -> TokenizeOut:
    """Token ids of a text, as the model sees it."""
    tokens = await ctx.engine.encode(body.text, add_special_tokens=body.add_special_tokens)
    return TokenizeOut(tokens=tokens, count=len(tokens))


@router.post("/detokenize", response_model=DetokenizeOut)
async def detokenize(body: DetokenizeBody, ctx: ServedDep) -> DetokenizeOut:
    """The text of token ids (each must be in the vocabulary)."""
    check_token_ids(body.tokens, ctx.limits, "tokens")
    text = ctx.engine.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)
    return DetokenizeOut(text=text)


# -- helpers shared with the OpenAI routes --------------------------------------------------


def log_prompt(request: Request, ctx: Served, prompt: Any) -> None:
    """Prompt text reaches the log only when the operator asked for it."""
    if ctx.settings.log_prompts:
        logger.info(
            "request %s prompt: %.4000r", scope_state(request.scope).get("request_id"), prompt
        )


async def run_embed(
    request: Request,
    ctx: Served,
    inputs: Sequence[str] | Sequence[list[int]],
    pooling: Pooling,
    normalize: bool,
) -> EmbedResult:
    """Embeddings of checked inputs; a client that leaves cancels them."""
    check_cap(len(inputs), ctx.limits.max_embed_batch, "input")
    ids = [await prompt_ids(ctx.engine, ctx.limits, item, "input") for item in inputs]
    return await until_disconnect(
        request, ctx.engine.embed(ids, pooling=pooling, normalize=normalize)
    )


def embedding_dim(result: EmbedResult) -> int:
    return len(result.embeddings[0]) if result.embeddings else 0


def record_tokens(request: Request, prompt_tokens: int, completion_tokens: int) -> None:
    """Token counts for the access-log line."""
    state = scope_state(request.scope)
    state["prompt_tokens"] = prompt_tokens
    state["completion_tokens"] = completion_tokens


# -- rendering -------------------------------------------------------------------------------


def _native_result(
    request: Request, ctx: Served, body: GenerateBody, choice: Choice, response_id: str
) -> GenerateOut:
    usage = choice_usage(choice)
    record_tokens(request, usage.prompt_tokens, usage.completion_tokens)
    result: dict[str, Any] = {
        "id": response_id,
        "text": "".join(choice.text),
        "finish_reason": choice.finish_reason or "abort",
        "usage": _usage(usage),
    }
    if body.return_token_ids:
        result["token_ids"] = choice.token_ids
    if body.logprobs is not None:
        result["logprobs"] = native_logprobs(ctx.engine.tokenizer, choice.logprobs)
    return GenerateOut.model_validate(result)


async def _native_events(
    request: Request, ctx: Served, body: GenerateBody, generation: Generation, response_id: str
) -> AsyncIterator[dict[str, Any]]:
    async for _, event in generation.events():
        yield _native_event(request, ctx, body, event, response_id)


def _native_event(
    request: Request, ctx: Served, body: GenerateBody, event: GenerateEvent, response_id: str
) -> dict[str, Any]:
    payload: dict[str, Any] = {"id": response_id, "text": event.text}
    if body.return_token_ids:
        payload["token_ids"] = event.token_ids
    if body.logprobs is not None:
        payload["logprobs"] = native_logprobs(ctx.engine.tokenizer, event.logprobs or [])
    if event.finish_reason is not None:
        payload["finish_reason"] = event.finish_reason
        if event.usage is not None:
            record_tokens(request, event.usage.prompt_tokens, event.usage.completion_tokens)
            payload["usage"] = _usage(event.usage)
    return payload


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
