"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response

from service.api.errors import ERROR_RESPONSES, APIError, bad_request
from service.api.render_openai import (
    PromptView,
    Reply,
    UsageSink,
    best_choices,
    chat_body,
    chat_chunks,
    completion_body,
    completion_chunks,
    drop_generated,
    embedding_data,
)
from service.api.routes.common import (
    embedding_dim,
    log_prompt,
    record_tokens,
    render_messages,
    run_embed,
)
from service.api.runtime import Served, ServedDep
from service.api.schemas.dialects import ignored_fields, ignored_header
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
from service.engine.types import GenerateRequest

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)
_STARTED = int(time.time())


@router.get("/models", response_model=ModelList)
async def list_models(ctx: ServedDep) -> ModelList:
    return ModelList(data=[_card(ctx, name) for name in ctx.settings.served_names])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, ctx: ServedDep) -> ModelCard:
    check_model(model_id, ctx)
    return _card(ctx, model_id)


@router.post("/completions", response_model=CompletionOut, responses=SSE_RESPONSE)
async def completions(
    body: CompletionBody, request: Request, response: Response, ctx: ServedDep
) -> Any:
    check_model(body.model, ctx)
    headers = ignored_header(body.check(ctx.limits))
    texts = body.prompts()
    truncate = body.truncate_prompt_tokens
    special = body.parse_special_tokens
    prompts = [
        await prompt_ids(ctx.engine, ctx.limits, prompt, truncate=truncate, parse_special=special)
        for prompt in texts
    ]
    log_prompt(request, ctx, body.prompt)
    # max_tokens 0 (echo only): the prompt's logits draw one token, which is not shown.
    requested = 1 if body.max_tokens == 0 else body.max_tokens
    prompt_logprobs = body.engine_prompt_logprobs
    requests = [
        GenerateRequest(
            ids,
            body.with_dialect(
                body.to_sampling_params(_max_tokens(requested, ids, ctx, default=True), choice),
                prompt_logprobs,
            ),
        )
        for ids in prompts
        for choice in range(body.candidates)
    ]
    reply = Reply(
        "text_completion",
        ctx.settings.model_name,
        ctx.engine.tokenizer,
        sum(map(len, prompts)),
        body.logprobs is not None,
        body.include_usage,
        continuous_usage=body.continuous_usage,
        return_token_ids=body.return_token_ids,
        echo=body.echo,
        include_stop_str=body.include_stop_str_in_output,
        drop_generated=body.max_tokens == 0,
        num_logprobs=body.logprobs or 0,
        prompt_logprobs=body.prompt_logprobs is not None,
    )
    # The engine has checked the ids once it started them: only then may they be decoded.
    generation = await until_disconnect(request, Generation.start(ctx.engine, requests))
    views = _prompt_views(ctx, body, texts, prompts)
    reply.prompts = [views[i // body.n] for i in range(len(prompts) * body.n)]
    if body.stream:
        return SSEResponse(
            completion_chunks(reply, generation, _usage_sink(request)),
            on_close=generation.close,
            headers=headers,
        )
    choices = await until_disconnect(
        request, generation.collect([len(r.prompt_token_ids) for r in requests])
    )
    if body.max_tokens == 0:
        drop_generated(choices)
    if body.candidates > body.n:
        choices = best_choices(choices, body.n, body.candidates)
    response.headers.update(headers)
    return _recorded(request, completion_body(reply, choices))


@router.post("/chat/completions", response_model=ChatCompletionOut, responses=SSE_RESPONSE)
async def chat_completions(
    body: ChatCompletionBody, request: Request, response: Response, ctx: ServedDep
) -> Any:
    check_model(body.model, ctx)
    headers = ignored_header(body.check(ctx.limits))
    plan = body.tool_plan()
    text, rendered = await _render_chat(body, ctx, plan)
    log_prompt(request, ctx, text)
    ids = await prompt_ids(
        ctx.engine, ctx.limits, rendered, "messages", truncate=body.truncate_prompt_tokens
    )
    max_tokens = _max_tokens(body.requested_max_tokens, ids, ctx, default=False)
    requests = [
        GenerateRequest(
            ids,
            body.with_dialect(body.to_sampling_params(max_tokens, choice), body.prompt_logprobs),
        )
        for choice in range(body.n)
    ]
    last = body.messages[-1]
    reply = Reply(
        "chat.completion",
        ctx.settings.model_name,
        ctx.engine.tokenizer,
        len(ids),
        body.logprobs,
        body.include_usage,
        tools=plan,
        continuous_usage=body.continuous_usage,
        return_token_ids=body.return_token_ids,
        prompt_logprobs=body.prompt_logprobs is not None,
        prompts=[PromptView(ids, text)],
        include_stop_str=body.include_stop_str_in_output,
        chat_echo=last.text if body.echo and last.role == "assistant" else "",
    )
    generation = await until_disconnect(request, Generation.start(ctx.engine, requests))
    if body.stream:
        return SSEResponse(
            chat_chunks(reply, generation, _usage_sink(request)),
            on_close=generation.close,
            headers=headers,
        )
    choices = await until_disconnect(request, generation.collect([len(ids)] * body.n))
    response.headers.update(headers)
    return _recorded(request, chat_body(reply, choices))


@router.post("/embeddings", response_model=EmbeddingOut)
async def embeddings(
    body: EmbeddingBody, request: Request, response: Response, ctx: ServedDep
) -> Any:
    check_model(body.model, ctx)
    response.headers.update(ignored_header(ignored_fields(body)))
    inputs = body.inputs()
    if body.truncate_prompt_tokens is not None:
        n = body.truncate_prompt_tokens
        inputs = [
            ids[-n:]
            for ids in [await prompt_ids(ctx.engine, ctx.limits, item, "input") for item in inputs]
        ]
    result = await run_embed(request, ctx, inputs, pooling="mean", normalize=body.normalize)
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
    if name not in ctx.settings.served_names:
        message = (
            f"the model '{name}' does not exist; this server serves '{ctx.settings.model_name}'"
        )
        raise APIError(404, message, code="model_not_found", param="model")


def _prompt_views(
    ctx: Served, body: CompletionBody, texts: list[str | list[int]], prompts: list[list[int]]
) -> list[PromptView]:
    """Each prompt's ids and its text for echo: as sent, else (token ids, truncated) decoded.
    Only after the engine accepted the ids: an id outside the vocabulary is its 400."""
    views = []
    for text, ids in zip(texts, prompts, strict=True):
        if isinstance(text, str) and body.truncate_prompt_tokens is None:
            shown = text
        elif body.echo:
            shown = ctx.engine.tokenizer.decode(ids, skip_special_tokens=False)
        else:
            shown = ""
        views.append(PromptView(ids, shown))
    return views


def _card(ctx: Served, name: str) -> ModelCard:
    return ModelCard(id=name, created=_STARTED, max_model_len=ctx.engine.max_model_len)


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
    tools = None
    if template_supports_tools(getattr(ctx.engine.tokenizer, "chat_template", None)):
        tools = plan.tools if plan is not None else None
    elif plan is not None or any(m.role == "tool" or m.tool_calls for m in body.messages):
        messages = fallback_messages(messages, plan)
    return await render_messages(
        ctx,
        messages,
        body.add_generation_prompt,
        body.continue_final_message,
        body.chat_template_kwargs,
        tools=tools,
    )


def _usage_sink(request: Request) -> UsageSink:
    def sink(usage: dict[str, Any]) -> None:
        record_tokens(request, usage["prompt_tokens"], usage["completion_tokens"])

    return sink


def _recorded(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    record_tokens(request, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
    return body
