"""What the native and OpenAI renderings share: token text and bytes, finite logprobs, usage."""

from __future__ import annotations

from service.api.serving import Choice
from service.engine.types import TokenizerLike, Usage

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


def choice_usage(choice: Choice) -> Usage:
    return choice.usage or Usage(
        prompt_tokens=choice.prompt_tokens, completion_tokens=len(choice.token_ids)
    )
