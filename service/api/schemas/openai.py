"""OpenAI-compatible request and response bodies.

Supported fields follow the OpenAI API. Accepted but ignored because they are
harmless: ``user``, an empty ``logit_bias``, a message ``name``. Refused with
400: ``echo: true``, ``suffix``, ``best_of`` other than ``n``, a non-empty
``logit_bias``, and any field not declared here (tools, response_format, ...).
Extensions (as in vLLM): ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``.
"""

from __future__ import annotations

from typing import Annotated, Literal, cast

from pydantic import Field

from service.api.errors import bad_request
from service.api.schemas.common import (
    MAX_TEXT_CHARS,
    MAX_TOKEN_LIST,
    ChoiceCount,
    MaxTokens,
    NonEmptyText,
    ParseSpecial,
    ResponseModel,
    SamplingFields,
    StopList,
    StopString,
    StrictModel,
    TokenId,
    TokenIds,
    TopLogprobs,
)
from service.api.serving import Limits, check_cap, check_stop
from service.settings import HARD_MAX_BATCH

ModelName = Annotated[str, Field(min_length=1, max_length=256)]
PromptText = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
PromptBatch = Annotated[list[PromptText], Field(min_length=1, max_length=HARD_MAX_BATCH)]
TokenBatch = Annotated[list[TokenIds], Field(min_length=1, max_length=HARD_MAX_BATCH)]


class StreamOptions(StrictModel):
    include_usage: bool = False


class _SamplingFields(SamplingFields):
    """Fields common to completions and chat completions."""

    model: ModelName
    n: ChoiceCount = 1
    stop: StopString | StopList | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str | None, Field(max_length=256, description="accepted and ignored")] = None
    logit_bias: Annotated[
        dict[str, float] | None, Field(max_length=0, description="only empty")
    ] = None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_common(self, limits: Limits, top_logprobs: int | None) -> None:
        check_stop(self.stop_list, limits)
        check_cap(self.n, limits.max_n, "n")
        check_cap(top_logprobs, limits.max_logprobs, "logprobs")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")


class CompletionBody(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: PromptText | PromptBatch | TokenIds | TokenBatch
    max_tokens: MaxTokens = None
    logprobs: TopLogprobs = None
    echo: bool = Field(False, description="only false")
    best_of: Annotated[int | None, Field(ge=1, le=128, description="only equal to n")] = None
    suffix: Annotated[str | None, Field(max_length=0, description="not supported")] = None
    parse_special_tokens: ParseSpecial = False

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list of texts or a list of token-id lists."""
        return _as_batch(self.prompt)

    def check(self, limits: Limits) -> None:
        self.check_common(limits, self.logprobs)
        if self.echo:
            raise bad_request("echo is not supported", "echo", code="unsupported")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is only supported equal to n", "best_of", code="unsupported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise bad_request("the prompt must not be empty", "prompt", code="empty_prompt")
        if len(self.prompts()) > limits.max_prompts:
            raise bad_request(f"at most {limits.max_prompts} prompts per request", "prompt")

    @property
    def engine_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(StrictModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[TextPart], Field(max_length=1024)]
    )
    name: Annotated[str | None, Field(max_length=256, description="accepted and ignored")] = None

    def to_template(self) -> dict[str, str]:
        content = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class ChatCompletionBody(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    logprobs: bool = False
    top_logprobs: TopLogprobs = None

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self, limits: Limits) -> None:
        self.check_common(limits, self.top_logprobs)
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")


EmbeddingTokens = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKEN_LIST)]


class EmbeddingBody(StrictModel):
    """``POST /v1/embeddings``."""

    model: ModelName
    input: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(min_length=1, max_length=HARD_MAX_BATCH)]
        | EmbeddingTokens
        | Annotated[list[EmbeddingTokens], Field(min_length=1, max_length=HARD_MAX_BATCH)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[
        int | None, Field(ge=1, le=1 << 16, description="only the model's own size")
    ] = None
    user: Annotated[str | None, Field(max_length=256, description="accepted and ignored")] = None

    def inputs(self) -> list[str] | list[list[int]]:
        return _as_batch(self.input)


def _as_batch(value: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """One prompt (text or token ids) or a batch of them, as a batch."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [cast(list[int], value)]
    return cast(list[str] | list[list[int]], list(value))


# -- responses ---------------------------------------------------------------------


class UsageDetails(ResponseModel):
    cached_tokens: int = 0


class CompletionUsage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: UsageDetails | None = None


class LegacyLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None


class CompletionOut(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class TopLogprobOut(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(ResponseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionOut(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class EmbeddingItem(ResponseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingOut(ResponseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptserve"
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
