"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from service.api.errors import ERROR_RESPONSES, APIError, bad_request, template_error
from service.api.render_openai import (
    Reply,
    UsageSink,
    chat_body,
    chat_chunks,
    completion_body,
    completion_chunks,
    embedding_data,
)
from service.api.routes.common import embedding_dim, log_prompt, record_tokens, run_embed
from service.api.runtime import Served, ServedDep
from service.api.schemas.openai import (
    ChatCompletionBody,
    ChatCompletionOut,
    CompletionBody,
    CompletionOut,
    EmbeddingBody,
    EmbeddingOut,
    ModelCard,
    ModelList,
)
from service.api.serving import Generation, prompt_ids, resolve_max_tokens, until_disconnect
from service.api.sse import SSE_RESPONSE, SSEResponse
from service.api.tools import ToolPlan, fallback_messages, template_supports_tools
from service.engine.types import GenerateRequest, TemplateError

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)
_STARTED = int(time.time())


@router.get("/models", response_model=ModelList)
async def list_models(ctx: ServedDep) -> ModelList:
    return ModelList(data=[_card(ctx)])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, ctx: ServedDep) -> ModelCard:
    check_model(model_id, ctx)
    return _card(ctx)


@router.post("/completions", response_model=CompletionOut, responses=SSE_RESPONSE)
async def completions(body: CompletionBody, request: Request, ctx: ServedDep) -> Any:
    check_model(body.model, ctx)
    body.check(ctx.limits)
    prompts = [
        await prompt_ids(ctx.engine, ctx.limits, prompt, parse_special=body.parse_special_tokens)
        for prompt in body.prompts()
    ]
    log_prompt(request, ctx, body.prompt)
    requests = [
        GenerateRequest(
            ids,
            body.to_sampling_params(_max_tokens(body.max_tokens, ids, ctx, default=True), choice),
        )
        for ids in prompts
        for choice in range(body.n)
    ]
    reply = Reply(
        "text_completion",
        ctx.settings.model_name,
        ctx.engine.tokenizer,
        sum(map(len, prompts)),
        body.logprobs is not None,
        body.include_usage,
    )
    generation = await until_disconnect(request, Generation.start(ctx.engine, requests))
    if body.stream:
        return SSEResponse(
            completion_chunks(reply, generation, _usage_sink(request)), on_close=generation.close
        )
    choices = await until_disconnect(
        request, generation.collect([len(r.prompt_token_ids) for r in requests])
    )
    return _recorded(request, completion_body(reply, choices))


@router.post("/chat/completions", response_model=ChatCompletionOut, responses=SSE_RESPONSE)
async def chat_completions(body: ChatCompletionBody, request: Request, ctx: ServedDep) -> Any:
    check_model(body.model, ctx)
    body.check(ctx.limits)
    plan = body.tool_plan()
    text, rendered = await _render_chat(body, ctx, plan)
    log_prompt(request, ctx, text)
    ids = await prompt_ids(ctx.engine, ctx.limits, rendered, "messages")
    max_tokens = _max_tokens(body.requested_max_tokens, ids, ctx, default=False)
    requests = [
        GenerateRequest(ids, body.to_sampling_params(max_tokens, choice))
        for choice in range(body.n)
    ]
    reply = Reply(
        "chat.completion",
        ctx.settings.model_name,
        ctx.engine.tokenizer,
        len(ids),
        body.logprobs,
        body.include_usage,
        tools=plan,
    )
    generation = await until_disconnect(request, Generation.start(ctx.engine, requests))
    if body.stream:
        return SSEResponse(
            chat_chunks(reply, generation, _usage_sink(request)), on_close=generation.close
        )
    choices = await until_disconnect(request, generation.collect([len(ids)] * body.n))
    return _recorded(request, chat_body(reply, choices))


@router.post("/embeddings", response_model=EmbeddingOut)
async def embeddings(body: EmbeddingBody, request: Request, ctx: ServedDep) -> Any:
    check_model(body.model, ctx)
    result = await run_embed(request, ctx, body.inputs(), pooling="mean", normalize=True)
    dim = embedding_dim(result)
    if body.dimensions is not None and body.dimensions != dim:
        raise bad_request(
            f"this model's embeddings have {dim} dimensions", "dimensions", code="unsupported"
        )
    record_tokens(request, result.prompt_tokens, 0)
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {
        "object": "list",
        "data": embedding_data(result.embeddings, body.encoding_format),
        "model": ctx.settings.model_name,
        "usage": usage,
    }


# -- helpers -------------------------------------------------------------------------------


def check_model(name: str, ctx: Served) -> None:
    if name != ctx.settings.model_name:
        message = (
            f"the model '{name}' does not exist; this server serves '{ctx.settings.model_name}'"
        )
        raise APIError(404, message, code="model_not_found", param="model")


def _card(ctx: Served) -> ModelCard:
    return ModelCard(
        id=ctx.settings.model_name, created=_STARTED, max_model_len=ctx.engine.max_model_len
    )


def _max_tokens(requested: int | None, ids: list[int], ctx: Served, default: bool) -> int:
    fallback = ctx.limits.default_max_tokens if default else None
    return resolve_max_tokens(requested, len(ids), ctx.limits, fallback)


async def _render_chat(
    body: ChatCompletionBody, ctx: Served, plan: ToolPlan | None
) -> tuple[str, list[int]]:
    """The conversation through the model's chat template, and its token ids, off the
    event loop. Only the template's own markers become control tokens. Tools, tool
    calls and tool results go to a template that knows them, else through the fallback
    (``service/api/tools.py``)."""
    messages = [message.to_template() for message in body.messages]
    tokenizer = ctx.engine.tokenizer
    kwargs: dict[str, Any] = {"add_generation_prompt": True}
    if template_supports_tools(getattr(tokenizer, "chat_template", None)):
        if plan is not None:
            kwargs["tools"] = plan.tools
    elif plan is not None or any(m.role == "tool" or m.tool_calls for m in body.messages):
        messages = fallback_messages(messages, plan)
    try:
        return await asyncio.to_thread(tokenizer.encode_chat, messages, **kwargs)
    except TemplateError as exc:
        raise template_error(exc, "messages") from exc


def _usage_sink(request: Request) -> UsageSink:
    def sink(usage: dict[str, Any]) -> None:
        record_tokens(request, usage["prompt_tokens"], usage["completion_tokens"])

    return sink


def _recorded(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    record_tokens(request, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
    return body
