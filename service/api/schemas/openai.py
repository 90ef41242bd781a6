"""OpenAI-compatible request and response bodies.

Supported fields follow the OpenAI API. Accepted but ignored because they are
harmless: ``user``, an empty ``logit_bias``, a message ``name``. Refused with
400: ``echo: true``, ``suffix``, ``best_of`` other than ``n``, a non-empty
``logit_bias``, and any field not declared here.
Extensions (as in vLLM): ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``. Structured output and tools (``response_format``,
``guided_*``, ``structured_outputs``, ``tools``, ``tool_choice``,
``parallel_tool_calls``): ``schemas/structured.py``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, cast

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
from service.api.schemas.structured import (
    FunctionName,
    GuidedFields,
    ToolFields,
    one_constraint,
)
from service.api.serving import Limits, check_cap, check_stop
from service.api.tools import ToolPlan
from service.engine.types import Constraint
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


class CompletionBody(GuidedFields, _SamplingFields):
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


# -- tool calls in the conversation (structured output and tools) ---------------------


class ToolCallFunction(StrictModel):
    name: FunctionName
    arguments: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class ToolCallIn(StrictModel):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message with tool_calls (checked by ChatCompletionBody).
    content: (
        Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[TextPart], Field(max_length=1024)]
        | None
    ) = None
    name: Annotated[str | None, Field(max_length=256, description="accepted and ignored")] = None
    tool_calls: Annotated[list[ToolCallIn] | None, Field(max_length=128)] = None
    tool_call_id: Annotated[str | None, Field(min_length=1, max_length=256)] = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )

    def to_template(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self.text}
        if self.tool_calls:
            # Templates (as in transformers) read the arguments as a mapping.
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _arguments(c.function.arguments),
                    },
                }
                for c in self.tool_calls
            ]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
            if self.name is not None:
                message["name"] = self.name
        return message

    def check(self, index: int) -> None:
        param = f"messages.{index}"
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise bad_request(
                "content may be null only in an assistant message with tool_calls",
                f"{param}.content",
            )
        if self.tool_calls and self.role != "assistant":
            raise bad_request("only assistant messages carry tool_calls", f"{param}.tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise bad_request("a tool message needs tool_call_id", f"{param}.tool_call_id")
        for j, call in enumerate(self.tool_calls or []):
            if not isinstance(_arguments(call.function.arguments), dict):
                raise bad_request(
                    "arguments must be a JSON object, as a string",
                    f"{param}.tool_calls.{j}.function.arguments",
                )


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class ChatCompletionBody(GuidedFields, ToolFields, _SamplingFields):
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
        for i, message in enumerate(self.messages):
            message.check(i)
        self.check_tools()
        self.engine_constraint()  # two constraints at once: a 400 now

    def tool_plan(self) -> ToolPlan | None:
        """How the tools are used; None without tools or with tool_choice "none"."""
        mode = self.tool_mode()
        if mode == "none" or not self.tools:
            return None
        named = mode not in ("auto", "required")
        return ToolPlan(
            tools=[t.model_dump(exclude_none=True) for t in self.tools],
            mode="named" if named else mode,
            forced_name=mode if named else None,
            parallel=self.parallel_tool_calls is not False,
        )

    def engine_constraint(self) -> Constraint | None:
        found = self.guided_constraints()
        plan = self.tool_plan()
        forced = plan.constraint() if plan is not None else None
        if forced is not None:
            found.append(forced)
        return one_constraint(found)


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


class ToolCallOut(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


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
