"""Ollama's API: /api/generate, /api/chat (NDJSON streams or one object), /api/embed,
/api/embeddings, /api/tags, /api/show, /api/ps, /api/version.

Responses carry Ollama's fields (``done``, ``done_reason``, ``prompt_eval_count``,
``eval_count`` and the durations in nanoseconds). A model is named as served,
optionally with Ollama's ``:latest`` tag.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.errors import ERROR_RESPONSES, APIError
from service.api.routes.common import log_prompt, record_tokens, render_messages, run_embed
from service.api.runtime import Served, ServedDep, package_version
from service.api.schemas.ollama import ChatBody, EmbedBody, GenerateBody, ShowBody
from service.api.serving import Generation, prompt_ids, resolve_max_tokens, until_disconnect
from service.api.sse import NDJSONResponse
from service.engine.types import GenerateEvent, GenerateRequest

router = APIRouter(prefix="/api", tags=["ollama"], responses=ERROR_RESPONSES)

# The version of Ollama's API these routes follow (clients compare it with their minimum).
OLLAMA_API_VERSION = "0.12.0"
_STARTED = datetime.now(UTC)


@router.get("/version")
async def version() -> dict[str, Any]:
    return {"version": OLLAMA_API_VERSION, "gptserve": package_version()}


@router.get("/tags")
async def tags(ctx: ServedDep) -> dict[str, Any]:
    return {"models": [_model_entry(ctx)]}


@router.get("/ps")
async def ps(ctx: ServedDep) -> dict[str, Any]:
    entry = _model_entry(ctx)
    entry.pop("modified_at")
    entry["expires_at"] = "2262-01-01T00:00:00Z"  # never unloaded
    entry["size_vram"] = 0 if str(ctx.engine.device) == "cpu" else entry["size"]
    return {"models": [entry]}


@router.post("/show")
async def show(body: ShowBody, ctx: ServedDep) -> dict[str, Any]:
    check_ollama_model(body.model or body.name or "", ctx)
    config = ctx.engine.model_config
    arch = str(getattr(config, "arch", "llama"))
    info = {
        "general.architecture": arch,
        "general.parameter_count": _param_count(ctx),
        f"{arch}.context_length": ctx.engine.max_model_len,
        f"{arch}.embedding_length": getattr(config, "n_embd", 0),
        f"{arch}.block_count": getattr(config, "n_layer", 0),
        f"{arch}.attention.head_count": getattr(config, "n_head", 0),
        f"{arch}.vocab_size": getattr(config, "vocab_size", 0),
    }
    return {
        "modelfile": f"FROM {ctx.settings.model}\n",
        "parameters": "",
        "template": "",
        "details": _details(ctx),
        "model_info": info,
        "capabilities": ["completion", "embedding"],
        "modified_at": _STARTED.isoformat(),
    }


@router.post("/generate")
async def generate(body: GenerateBody, request: Request, ctx: ServedDep) -> Any:
    """A completion of ``prompt`` (through the chat template unless ``raw``)."""
    check_ollama_model(body.model, ctx)
    body.check()
    if not body.prompt and not body.system:  # Ollama's way to load a model
        return _load_reply(ctx, {"response": ""}, body.stream)
    prompt: str | list[int]
    if body.raw:  # the client's own prompt: its special-token spellings stay plain text
        text = prompt = body.prompt
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        text, prompt = await render_messages(ctx, messages)
    log_prompt(request, ctx, text)
    ids = await prompt_ids(ctx.engine, ctx.limits, prompt)
    return await _run(request, ctx, body.stream, ids, body.options, "generate")


@router.post("/chat")
async def chat(body: ChatBody, request: Request, ctx: ServedDep) -> Any:
    """The assistant's next message in a conversation."""
    check_ollama_model(body.model, ctx)
    body.check()
    if not body.messages:
        return _load_reply(ctx, {"message": {"role": "assistant", "content": ""}}, body.stream)
    text, rendered = await render_messages(ctx, [m.to_template() for m in body.messages])
    log_prompt(request, ctx, text)
    ids = await prompt_ids(ctx.engine, ctx.limits, rendered, "messages")
    return await _run(request, ctx, body.stream, ids, body.options, "chat")


@router.post("/embed")
async def embed(body: EmbedBody, request: Request, ctx: ServedDep) -> dict[str, Any]:
    check_ollama_model(body.model, ctx)
    start = time.perf_counter_ns()
    result = await run_embed(request, ctx, body.texts(), pooling="mean", normalize=True)
    record_tokens(request, result.prompt_tokens, 0)
    return {
        "model": body.model,
        "embeddings": result.embeddings,
        "total_duration": time.perf_counter_ns() - start,
        "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens,
    }


@router.post("/embeddings")
async def embeddings(body: EmbedBody, request: Request, ctx: ServedDep) -> dict[str, Any]:
    """The older single-text form: ``prompt`` in, ``embedding`` out."""
    check_ollama_model(body.model, ctx)
    result = await run_embed(request, ctx, body.texts()[:1], pooling="mean", normalize=True)
    record_tokens(request, result.prompt_tokens, 0)
    return {"embedding": result.embeddings[0]}


# -- helpers ------------------------------------------------------------------------------


def check_ollama_model(name: str, ctx: Served) -> None:
    served = ctx.settings.model_name
    if name.removesuffix(":latest") not in ctx.settings.served_names:
        raise APIError(
            404,
            f"model '{name}' not found; this server serves '{served}'",
            code="model_not_found",
            param="model",
        )


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _load_reply(ctx: Served, content: dict[str, Any], stream: bool) -> Any:
    body = {
        "model": ctx.settings.model_name,
        "created_at": _now(),
        **content,
        "done": True,
        "done_reason": "load",
    }
    if stream:
        return NDJSONResponse(_once(body))
    return JSONResponse(body)


async def _once(body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield body


async def _run(
    request: Request, ctx: Served, stream: bool, ids: list[int], options: Any, kind: str
) -> Any:
    max_tokens = resolve_max_tokens(options.max_tokens(), len(ids), ctx.limits, None)
    engine_request = GenerateRequest(ids, options.sampling(max_tokens))
    start = time.perf_counter_ns()
    generation = await until_disconnect(request, Generation.start(ctx.engine, [engine_request]))
    first = time.perf_counter_ns()
    model = ctx.settings.model_name
    tally = _Tally(start, first, len(ids))

    def piece(text: str) -> dict[str, Any]:
        if kind == "chat":
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    if stream:

        async def lines() -> AsyncIterator[dict[str, Any]]:
            async for _, event in generation.events():
                tally.add(event)
                line = {"model": model, "created_at": _now(), **piece(event.text), "done": False}
                if event.finish_reason is None:
                    if event.text:
                        yield line
                    continue
                if event.text:
                    yield line
                record_tokens(request, len(ids), tally.tokens)
                yield {
                    "model": model,
                    "created_at": _now(),
                    **piece(""),
                    **tally.final(event, ids if kind == "generate" else None),
                }

        return NDJSONResponse(lines(), on_close=generation.close)
    events = [e for _, e in await until_disconnect(request, _all_events(generation))]
    for event in events:
        tally.add(event)
    record_tokens(request, len(ids), tally.tokens)
    last = events[-1]
    texts = [e.text for e in events]
    return {
        "model": model,
        "created_at": _now(),
        **piece("".join(texts)),
        **tally.final(last, ids if kind == "generate" else None),
    }


async def _all_events(generation: Generation) -> list[tuple[int, GenerateEvent]]:
    return [item async for item in generation.events()]


class _Tally:
    """Token counts and timings for the final line."""

    def __init__(self, start: int, first: int, prompt_tokens: int) -> None:
        self.start, self.first, self.prompt_tokens = start, first, prompt_tokens
        self.tokens = 0
        self.output: list[int] = []

    def add(self, event: GenerateEvent) -> None:
        self.tokens += len(event.token_ids)
        self.output.extend(event.token_ids)

    def final(self, event: GenerateEvent, prompt: list[int] | None) -> dict[str, Any]:
        end = time.perf_counter_ns()
        reason = event.finish_reason if event.finish_reason in ("stop", "length") else "stop"
        out: dict[str, Any] = {
            "done": True,
            "done_reason": reason,
            "total_duration": end - self.start,
            "load_duration": 0,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": self.first - self.start,
            "eval_count": self.tokens,
            "eval_duration": max(end - self.first, 1),
        }
        if prompt is not None:
            out["context"] = [*prompt, *self.output]
        return out


def _param_count(ctx: Served) -> int:
    model = getattr(ctx.engine, "model", None)
    count = getattr(model, "num_params", 0)
    return int(count() if callable(count) else count)


def _details(ctx: Served) -> dict[str, Any]:
    arch = str(getattr(ctx.engine.model_config, "arch", "llama"))
    params = _param_count(ctx)
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    model_file = ctx.settings.model
    return {
        "parent_model": "",
        "format": "gguf"
        if model_file.endswith(".gguf") or "/" not in model_file
        else "safetensors",
        "family": arch,
        "families": [arch],
        "parameter_size": size,
        "quantization_level": str(ctx.settings.weights),
    }


def _model_entry(ctx: Served) -> dict[str, Any]:
    name = ctx.settings.model_name
    params = _param_count(ctx)
    return {
        "name": name,
        "model": name,
        "modified_at": _STARTED.isoformat(),
        "size": params * 4,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _details(ctx),
    }
