"""Engine results in the native wire format: /generate's response and its streamed events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.api.render import choice_usage, finite, token_text
from service.api.schemas.native import GenerateOut
from service.api.serving import Choice
from service.engine.types import GenerateEvent, TokenizerLike, TokenLogprob, Usage


def generate_out(
    choice: Choice,
    response_id: str,
    tokenizer: TokenizerLike,
    token_ids: bool,
    logprobs: bool,
) -> GenerateOut:
    """The whole response of a finished generation."""
    result: dict[str, Any] = {
        "id": response_id,
        "text": "".join(choice.text),
        "finish_reason": choice.finish_reason or "abort",
        "usage": usage_out(choice_usage(choice)),
    }
    if token_ids:
        result["token_ids"] = choice.token_ids
    if logprobs:
        result["logprobs"] = native_logprobs(tokenizer, choice.logprobs)
    return GenerateOut.model_validate(result)


def generate_event(
    event: GenerateEvent,
    response_id: str,
    tokenizer: TokenizerLike,
    token_ids: bool,
    logprobs: bool,
) -> dict[str, Any]:
    """One streamed event; the last one carries ``finish_reason`` and ``usage``."""
    payload: dict[str, Any] = {"id": response_id, "text": event.text}
    if token_ids:
        payload["token_ids"] = event.token_ids
    if logprobs:
        payload["logprobs"] = native_logprobs(tokenizer, event.logprobs or [])
    if event.finish_reason is not None:
        payload["finish_reason"] = event.finish_reason
        if event.usage is not None:
            payload["usage"] = usage_out(event.usage)
    return payload


def native_logprobs(
    tokenizer: TokenizerLike, logprobs: Sequence[TokenLogprob]
) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token_id": token_id,
            "token": token_text(tokenizer, token_id),
            "logprob": finite(logprob),
        }

    return [
        {**entry(lp.token_id, lp.logprob), "top": [entry(t, v) for t, v in lp.top]}
        for lp in logprobs
    ]


def usage_out(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
