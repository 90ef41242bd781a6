"""Request and response bodies of the native routes: /generate, /embed, /tokenize, /detokenize."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from service.api.errors import bad_request
from service.api.schemas.common import (
    MAX_TEXT_CHARS,
    MaxTokens,
    NonEmptyText,
    ParseSpecial,
    ResponseModel,
    SamplingFields,
    StopList,
    StrictModel,
    TokenIds,
    TopLogprobs,
    UsageOut,
)
from service.api.schemas.dialects import MAX_TEMPLATE_KWARGS
from service.api.schemas.openai import ChatMessage
from service.api.schemas.structured import NativeConstraintFields
from service.api.serving import Limits, check_cap, check_stop
from service.settings import HARD_MAX_BATCH


class GenerateBody(NativeConstraintFields, SamplingFields):
    """``POST /generate``: sampling parameters are flat; every number is bounded. At most
    one of ``json_schema``, ``regex``, ``choice``, ``grammar`` constrains the output."""

    prompt: NonEmptyText
    max_tokens: MaxTokens = None
    stop: StopList = Field(
        default_factory=list, description="strings that end generation (never emitted)"
    )
    logprobs: TopLogprobs = Field(
        None, description="return each token's logprob and the top n alternatives"
    )
    stream: bool = False
    parse_special_tokens: ParseSpecial = False
    return_token_ids: bool = Field(False, description="include the generated token ids")

    def check(self, limits: Limits) -> None:
        check_stop(self.stop, limits)
        check_cap(self.logprobs, limits.max_logprobs, "logprobs")

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop)

    @property
    def engine_logprobs(self) -> int | None:
        return self.logprobs


class TopTokenOut(ResponseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprobOut(ResponseModel):
    token_id: int
    token: str
    logprob: float
    top: list[TopTokenOut]


class GenerateOut(ResponseModel):
    id: str
    text: str
    finish_reason: str
    usage: UsageOut
    token_ids: list[int] | None = None
    logprobs: list[TokenLogprobOut] | None = None


class EmbedBody(StrictModel):
    """``POST /embed``: one text or a batch of texts."""

    input: (
        NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=HARD_MAX_BATCH)]
    )
    pooling: Literal["mean", "last"] = "mean"
    normalize: bool = True

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbedUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbedOut(ResponseModel):
    embeddings: list[list[float]]
    dim: int
    usage: EmbedUsage


class TokenizeBody(StrictModel):
    """``text`` (this server's shape) or, as vLLM takes it, ``prompt`` or ``messages``."""

    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    add_special_tokens: bool | None = Field(
        None, description="default: true for text and prompt, false for messages (vLLM)"
    )
    # -- vLLM's request shape --
    model: Annotated[str | None, Field(max_length=256, description="accepted and ignored")] = None
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    messages: Annotated[list[ChatMessage] | None, Field(min_length=1, max_length=4096)] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Annotated[
        dict[Annotated[str, Field(max_length=256)], Any] | None,
        Field(max_length=MAX_TEMPLATE_KWARGS),
    ] = None
    return_token_strs: bool = False
    parse_special_tokens: ParseSpecial = False

    def check(self) -> None:
        given = [n for n in ("text", "prompt", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            raise bad_request("give exactly one of text, prompt or messages", "text")


class TokenizeOut(ResponseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None = None
    token_strs: list[str] | None = None


class DetokenizeBody(StrictModel):
    tokens: TokenIds
    skip_special_tokens: bool = True
    model: Annotated[str | None, Field(max_length=256, description="accepted and ignored")] = None


class DetokenizeOut(ResponseModel):
    text: str
    prompt: str | None = None  # vLLM's name for the same text


class InfoOut(ResponseModel):
    model: str
    version: str
    max_model_len: int
    dtype: str
    device: str
    weights: str = Field(
        default="", description='How linear weights are held: a dtype, or e.g. "q4 blocks".'
    )
    kv_cache_dtype: str = Field(default="", description="The KV cache's element type.")
    config: dict[str, Any]
    limits: dict[str, int]
