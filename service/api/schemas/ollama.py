"""Ollama's request bodies (``/api/generate``, ``/api/chat``, ``/api/embed``, ``/api/show``).

Field names are Ollama's. Sampling ``options`` map onto the engine's parameters
(``num_predict`` -> max_tokens, ``repeat_penalty`` -> repetition_penalty, ...);
the options that tune Ollama's own runner (``num_ctx``, ``num_gpu``, ``num_thread``,
``mirostat``...) and ``keep_alive`` are accepted and ignored, as are unknown fields.
``format`` (JSON output), ``tools``, ``images`` and a custom ``template`` are refused
with a 400: ignoring them would change the answer.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field

from service.api.errors import bad_request
from service.api.schemas.common import (
    MAX_TEXT_CHARS,
    SEED_MAX,
    NonEmptyText,
    StopString,
    StrictModel,
)
from service.engine.types import SamplingParams
from service.settings import HARD_MAX_BATCH, HARD_MAX_STOP, HARD_MAX_TOKENS

LENIENT = ConfigDict(extra="allow", strict=False, allow_inf_nan=False)
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
KeepAlive = Annotated[str | float | None, Field(description="accepted and ignored")]


class Options(StrictModel):
    """Ollama's ``options``; the sampling ones are honoured, the runner's are ignored."""

    model_config = LENIENT

    num_predict: Annotated[int | None, Field(ge=-2, le=HARD_MAX_TOKENS)] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.8
    top_k: Annotated[int, Field(ge=0, le=1 << 31)] = 40
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    seed: Annotated[int | None, Field(ge=-(1 << 31), le=SEED_MAX)] = None
    stop: Annotated[list[StopString] | None, Field(max_length=HARD_MAX_STOP)] = None

    def max_tokens(self) -> int | None:
        """num_predict: -1 (infinite) and -2 (fill the context) are both the context's rest."""
        n = self.num_predict
        return None if n is None or n < 0 else max(n, 1)

    def sampling(self, max_tokens: int) -> SamplingParams:
        seed = None if self.seed is None or self.seed < 0 else self.seed
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=list(self.stop or []),
            seed=seed,
        )


class _OllamaBody(StrictModel):
    model_config = LENIENT

    model: Annotated[str, Field(min_length=1, max_length=256)]
    options: Options = Field(default_factory=Options)
    stream: bool = True
    keep_alive: KeepAlive = None
    format: Annotated[str | dict[str, Any] | None, Field(description="refused unless empty")] = None
    think: bool | str | None = Field(None, description="accepted and ignored")

    def check_common(self) -> None:
        if self.format not in (None, ""):
            raise bad_request("'format' is not supported by this server", "format", "unsupported")
        if len(self.options.model_extra or {}) > 64:
            raise bad_request("at most 64 unknown options are accepted", "options")


class GenerateBody(_OllamaBody):
    """``POST /api/generate``."""

    prompt: Text = ""
    system: Text | None = None
    suffix: Annotated[str | None, Field(max_length=0, description="not supported")] = None
    raw: bool = False
    template: Annotated[str | None, Field(max_length=0, description="not supported")] = None
    images: Annotated[list[str] | None, Field(max_length=0, description="not supported")] = None
    context: Annotated[list[int] | None, Field(max_length=1 << 20)] = None

    def check(self) -> None:
        self.check_common()


class OllamaMessage(StrictModel):
    model_config = LENIENT

    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: Text = ""
    images: Annotated[list[str] | None, Field(max_length=0, description="not supported")] = None

    def to_template(self) -> dict[str, Any]:
        extra = {k: v for k, v in (self.model_extra or {}).items() if k not in ("images",)}
        return {**extra, "role": self.role, "content": self.content}


class ChatBody(_OllamaBody):
    """``POST /api/chat``."""

    messages: Annotated[list[OllamaMessage], Field(max_length=4096)] = Field(default_factory=list)
    tools: Annotated[list[Any] | None, Field(max_length=0, description="not supported")] = None

    def check(self) -> None:
        self.check_common()


class EmbedBody(StrictModel):
    """``POST /api/embed`` (and the older ``/api/embeddings`` with ``prompt``)."""

    model_config = LENIENT

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(min_length=1, max_length=HARD_MAX_BATCH)]
        | None
    ) = None
    prompt: NonEmptyText | None = None
    truncate: bool = True
    keep_alive: KeepAlive = None
    dimensions: Annotated[int | None, Field(ge=1, le=1 << 16)] = None
    options: dict[str, Any] | None = Field(None, max_length=64)

    def texts(self) -> list[str]:
        value = self.input if self.input is not None else self.prompt
        if value is None:
            raise bad_request("give 'input'", "input")
        return [value] if isinstance(value, str) else list(value)


class ShowBody(StrictModel):
    model_config = LENIENT

    model: Annotated[str | None, Field(max_length=256)] = None
    name: Annotated[str | None, Field(max_length=256)] = None
    verbose: bool = False
