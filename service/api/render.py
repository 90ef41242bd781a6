"""Engine results as response JSON: token logprobs in each API's format, usage totals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.api.serving import Choice
from service.engine.types import TokenizerLike, TokenLogprob, Usage

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; a token the model never picks gets this floor


def finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def token_text(tokenizer: TokenizerLike, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_bytes(tokenizer: TokenizerLike, token_id: int) -> list[int]:
    """The token's raw bytes (a piece of a multi-byte character is not valid UTF-8 alone)."""
    raw = getattr(tokenizer, "token_bytes", None)
    data = raw(token_id) if raw is not None else token_text(tokenizer, token_id).encode("utf-8")
    return list(data)


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


def choice_usage(choice: Choice) -> Usage:
    return choice.usage or Usage(
        prompt_tokens=choice.prompt_tokens, completion_tokens=len(choice.token_ids)
    )


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
