"""What the native and OpenAI routes share: prompt logging, token counts, embeddings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import Request

from service.api.errors import bad_request, template_error
from service.api.middleware import scope_state
from service.api.runtime import Served
from service.api.schemas.dialects import template_kwargs
from service.api.serving import check_cap, prompt_ids, until_disconnect
from service.engine.types import EmbedResult, FinalMessageNotShown, Pooling, TemplateError

logger = logging.getLogger(__name__)


def log_prompt(request: Request, ctx: Served, prompt: Any) -> None:
    """Prompt text reaches the log only when the operator asked for it."""
    if ctx.settings.log_prompts:
        logger.info(
            "request %s prompt: %.4000r", scope_state(request.scope).get("request_id"), prompt
        )


def record_tokens(request: Request, prompt_tokens: int, completion_tokens: int) -> None:
    """Token counts for the access-log line."""
    state = scope_state(request.scope)
    state["prompt_tokens"] = prompt_tokens
    state["completion_tokens"] = completion_tokens


async def run_embed(
    request: Request,
    ctx: Served,
    inputs: Sequence[str | list[int]],
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


async def render_messages(
    ctx: Served,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[int]]:
    """Messages through the chat template (vLLM's controls), off the event loop: the
    prompt text and its token ids, in which only the template's own markers are control
    tokens. ``continue_final_message``: the text ends where the final message's content
    ends."""
    extra = template_kwargs(kwargs)
    try:
        return await asyncio.to_thread(
            ctx.engine.tokenizer.encode_chat,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            continue_final_message=continue_final_message,
            **extra,
        )
    except TemplateError as exc:
        raise template_error(exc, "messages") from exc
    except FinalMessageNotShown as exc:
        raise bad_request(str(exc), "continue_final_message") from exc
    except ValueError as exc:
        raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from exc
