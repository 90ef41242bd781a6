"""OpenAI-compatible request and response bodies.

Supported fields follow the OpenAI API. Accepted but ignored because they are
harmless: ``user``, a message ``name``. Refused with 400: ``suffix``. Unknown
fields are ignored as vLLM ignores them (see ``schemas/dialects.py``).
Extensions (as in vLLM): ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``, and those of ``dialects.ClientFields``.
Structured output and tools (``response_format``, ``guided_*``,
``structured_outputs``, ``tools``, ``tool_choice``, ``parallel_tool_calls``):
``schemas/structured.py``.
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
from service.api.schemas.dialects import (
    LENIENT,
    MAX_TEMPLATE_KWARGS,
    ClientFields,
    ignored_fields,
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
from service.settings import HARD_MAX_BATCH, HARD_MAX_N, HARD_MAX_TOKENS

ModelName = Annotated[str, Field(min_length=1, max_length=256)]
PromptText = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
PromptBatch = Annotated[list[PromptText], Field(min_length=1, max_length=HARD_MAX_BATCH)]
TokenBatch = Annotated[list[TokenIds], Field(min_length=1, max_length=HARD_MAX_BATCH)]
MixedBatch = Annotated[list[PromptText | TokenIds], Field(min_length=1, max_length=HARD_MAX_BATCH)]


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="with include_usage: usage so far on every chunk (vLLM)"
    )


class _SamplingFields(ClientFields, SamplingFields):
    """Fields common to completions and chat completions."""

    model_config = LENIENT

    model: ModelName
    n: ChoiceCount = 1
    stop: StopString | StopList | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str | None, Field(max_length=256, description="accepted and ignored")] = None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        o = self.stream_options
        return o is not None and o.include_usage and o.continuous_usage_stats

    def check_common(self, limits: Limits, top_logprobs: int | None) -> list[str]:
        """Checks shared by both routes; returns the unknown fields, which are ignored."""
        ignored = ignored_fields(self)
        self.check_dialect(limits)
        check_stop(self.stop_list, limits)
        check_cap(self.n, limits.max_n, "n")
        check_cap(top_logprobs, limits.max_logprobs, "logprobs")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")
        return ignored


class CompletionBody(GuidedFields, _SamplingFields):
    """``POST /v1/completions``."""

    prompt: PromptText | PromptBatch | TokenIds | TokenBatch | MixedBatch
    max_tokens: Annotated[
        int | None,
        Field(ge=0, le=HARD_MAX_TOKENS, description="tokens to generate at most; 0 with echo"),
    ] = None
    logprobs: TopLogprobs = None
    echo: bool = Field(False, description="the prompt before the completion (and its logprobs)")
    best_of: Annotated[
        int | None, Field(ge=1, le=HARD_MAX_N, description="candidates; the n likeliest are kept")
    ] = None
    suffix: Annotated[str | None, Field(max_length=0, description="not supported")] = None
    parse_special_tokens: ParseSpecial = False

    def prompts(self) -> list[str | list[int]]:
        """The prompts: each a text or a token-id list."""
        return _as_batch(self.prompt)

    def check(self, limits: Limits) -> list[str]:
        ignored = self.check_common(limits, self.logprobs)
        if self.best_of is not None:
            check_cap(self.best_of, limits.max_n, "best_of")
            if self.best_of < self.n:
                raise bad_request("best_of must be at least n", "best_of")
            if self.best_of > self.n and self.stream:
                raise bad_request("best_of above n cannot be streamed", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens may be 0 only with echo: true", "max_tokens")
        if isinstance(self.prompt, list) and not self.prompt:
            raise bad_request("the prompt must not be empty", "prompt", code="empty_prompt")
        if len(self.prompts()) > limits.max_prompts:
            raise bad_request(f"at most {limits.max_prompts} prompts per request", "prompt")
        return ignored

    @property
    def candidates(self) -> int:
        """Engine requests per prompt: best_of when it asks for more than n."""
        return max(self.n, self.best_of or 0)

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """Top-n of each prompt token: for prompt_logprobs, and for echo with logprobs."""
        wanted = [self.prompt_logprobs]
        if self.echo and self.logprobs is not None:
            wanted.append(self.logprobs)
        values = [w for w in wanted if w is not None]
        return max(values) if values else None

    @property
    def engine_logprobs(self) -> int | None:
        if self.best_of is not None and self.best_of > self.n:
            return self.logprobs or 0  # ranking the candidates needs their logprobs
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
    """A message; a custom role and extra keys reach the chat template as they are (vLLM)."""

    model_config = LENIENT

    role: Annotated[str, Field(min_length=1, max_length=64)]
    # None only for an assistant message with tool_calls (checked by ChatCompletionBody).
    content: (
        Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[TextPart], Field(max_length=1024)]
        | None
    ) = None
    name: Annotated[str | None, Field(max_length=256, description="passed to the template")] = None
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
        extra = dict(self.model_extra or {})
        message: dict[str, Any] = {**extra, "role": role, "content": self.text}
        if self.name is not None:
            message["name"] = self.name
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
    # -- chat template controls (vLLM) --
    echo: bool = Field(
        False, description="prefix the reply with the last message when it is the assistant's"
    )
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Annotated[
        dict[Annotated[str, Field(max_length=256)], Any] | None,
        Field(max_length=MAX_TEMPLATE_KWARGS),
    ] = None

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

    def check(self, limits: Limits) -> list[str]:
        ignored = self.check_common(limits, self.top_logprobs)
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        for i, message in enumerate(self.messages):
            message.check(i)
        self.check_tools()
        self.engine_constraint()  # two constraints at once: a 400 now
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request(
                "continue_final_message needs add_generation_prompt: false",
                "continue_final_message",
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise bad_request(
                "continue_final_message needs a final assistant message", "continue_final_message"
            )
        return ignored

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

    model_config = LENIENT

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
    normalize: bool = Field(True, description="L2-normalise each vector (vLLM)")
    truncate_prompt_tokens: Annotated[int | None, Field(ge=1, le=1 << 20)] = None

    def inputs(self) -> list[str | list[int]]:
        return _as_batch(self.input)


def _as_batch(
    value: str | list[str] | list[int] | list[list[int]] | list[str | list[int]],
) -> list[str | list[int]]:
    """One prompt (text or token ids) or a batch of them (possibly mixed), as a batch."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [cast(list[int], value)]
    return cast(list[str | list[int]], list(value))


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
    token_logprobs: list[float | None]  # None: the first prompt token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(ResponseModel):
    """vLLM's ``prompt_logprobs`` entry, keyed by token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobsOut = list[dict[str, PromptLogprob] | None] | None


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobsOut = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


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
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None


class ChatCompletionOut(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    prompt_logprobs: PromptLogprobsOut = None
    prompt_token_ids: list[int] | None = None


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
