"""Native routes: /generate (JSON or SSE), /embed, /tokenize, /detokenize."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from service.api.errors import ERROR_RESPONSES
from service.api.render import choice_usage, token_text
from service.api.render_native import generate_event, generate_out
from service.api.routes.common import (
    embedding_dim,
    log_prompt,
    record_tokens,
    render_messages,
    run_embed,
)
from service.api.runtime import ServedDep
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
    Generation,
    prompt_ids,
    resolve_max_tokens,
    until_disconnect,
)
from service.api.sse import SSE_RESPONSE, SSEResponse
from service.engine.request import check_token_ids
from service.engine.types import GenerateRequest, TokenizerLike

router = APIRouter(tags=["native"], responses=ERROR_RESPONSES)


@router.post(
    "/generate",
    response_model=GenerateOut,
    response_model_exclude_none=True,
    responses=SSE_RESPONSE,
)
async def generate(body: GenerateBody, request: Request, ctx: ServedDep) -> Any:
    """Generate text for one prompt; ``"stream": true`` answers with Server-Sent Events."""
    body.check(ctx.limits)
    ids = await prompt_ids(
        ctx.engine, ctx.limits, body.prompt, parse_special=body.parse_special_tokens
    )
    max_tokens = resolve_max_tokens(
        body.max_tokens, len(ids), ctx.limits, ctx.limits.default_max_tokens
    )
    log_prompt(request, ctx, body.prompt)
    engine_request = GenerateRequest(ids, body.to_sampling_params(max_tokens))
    generation = await until_disconnect(request, Generation.start(ctx.engine, [engine_request]))
    response_id = f"gen-{engine_request.request_id}"
    tokenizer, logprobs = ctx.engine.tokenizer, body.logprobs is not None
    if body.stream:
        events = _events(request, generation, response_id, body, tokenizer)
        return SSEResponse(events, on_close=generation.close)
    [choice] = await until_disconnect(request, generation.collect([len(ids)]))
    usage = choice_usage(choice)
    record_tokens(request, usage.prompt_tokens, usage.completion_tokens)
    return generate_out(choice, response_id, tokenizer, body.return_token_ids, logprobs)


@router.post("/embed", response_model=EmbedOut)
async def embed(body: EmbedBody, request: Request, ctx: ServedDep) -> EmbedOut:
    """Embeddings of one text or a batch (mean or last-token pooling of the final hidden states)."""
    result = await run_embed(request, ctx, body.texts(), body.pooling, body.normalize)
    record_tokens(request, result.prompt_tokens, 0)
    usage = EmbedUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return EmbedOut(embeddings=result.embeddings, dim=embedding_dim(result), usage=usage)


@router.post("/tokenize", response_model=TokenizeOut, response_model_exclude_none=True)
async def tokenize(body: TokenizeBody, ctx: ServedDep) -> TokenizeOut:
    """Token ids of a text (``text`` or vLLM's ``prompt``) or of a conversation through the
    chat template (vLLM's ``messages``), as the model sees it. Special-token spellings in
    a text are plain text unless ``parse_special_tokens`` (as for prompts); in a
    conversation only the template's own markers are control tokens."""
    body.check()
    if body.messages is not None:
        _, tokens = await render_messages(
            ctx,
            [m.to_template() for m in body.messages],
            body.add_generation_prompt,
            body.continue_final_message,
            body.chat_template_kwargs,
        )
        if body.add_special_tokens:  # as the tokenizer adds them to a text (BOS)
            tokens = await ctx.engine.encode("", add_special_tokens=True) + tokens
    else:
        text = body.text if body.text is not None else body.prompt or ""
        special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = await ctx.engine.encode(
            text, add_special_tokens=special, parse_special=body.parse_special_tokens
        )
    token_strs = None
    if body.return_token_strs:
        token_strs = [token_text(ctx.engine.tokenizer, t) for t in tokens]
    return TokenizeOut(
        tokens=tokens,
        count=len(tokens),
        max_model_len=ctx.engine.max_model_len,
        token_strs=token_strs,
    )


@router.post("/detokenize", response_model=DetokenizeOut)
async def detokenize(body: DetokenizeBody, ctx: ServedDep) -> DetokenizeOut:
    """The text of token ids (each must be in the vocabulary)."""
    check_token_ids(body.tokens, ctx.limits.vocab_size, "tokens")
    text = ctx.engine.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)
    return DetokenizeOut(text=text, prompt=text)


async def _events(
    request: Request,
    generation: Generation,
    response_id: str,
    body: GenerateBody,
    tokenizer: TokenizerLike,
) -> AsyncIterator[dict[str, Any]]:
    logprobs = body.logprobs is not None
    async for _, event in generation.events():
        if event.finish_reason is not None and event.usage is not None:
            record_tokens(request, event.usage.prompt_tokens, event.usage.completion_tokens)
        yield generate_event(event, response_id, tokenizer, body.return_token_ids, logprobs)
