"""The Responses API's request body (``POST /v1/responses``).

Honoured: ``input`` (a string or a list of messages whose content is a string or
``input_text`` / ``output_text`` parts), ``instructions``, ``max_output_tokens``,
``temperature``, ``top_p``, ``stream``, ``text.format`` of type ``text``.
Accepted and ignored: ``store``, ``metadata``, ``user``, ``service_tier``,
``reasoning``, ``truncation``, ``include``, ``parallel_tool_calls``, and unknown fields.
Refused with 400: ``previous_response_id`` (nothing is stored), ``tools``,
other ``text.format`` types, and non-text input parts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from service.api.errors import bad_request
from service.api.schemas.common import (
    MAX_TEXT_CHARS,
    MaxTokens,
    StrictModel,
    Temperature,
    TopP,
)
from service.api.schemas.dialects import LENIENT

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class InputPart(StrictModel):
    model_config = LENIENT

    type: Literal["input_text", "output_text", "text"]
    text: Text


class InputMessage(StrictModel):
    model_config = LENIENT

    type: Literal["message"] = "message"
    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: Text | Annotated[list[InputPart], Field(max_length=1024)]

    def to_template(self) -> dict[str, Any]:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class TextFormat(StrictModel):
    model_config = LENIENT

    type: Annotated[str, Field(max_length=64)] = "text"


class TextOptions(StrictModel):
    model_config = LENIENT

    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesBody(StrictModel):
    """``POST /v1/responses``."""

    model_config = LENIENT

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Text | Annotated[list[InputMessage], Field(min_length=1, max_length=4096)]
    instructions: Text | None = None
    max_output_tokens: MaxTokens = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stream: bool = False
    text: TextOptions = Field(default_factory=TextOptions)
    previous_response_id: Annotated[str | None, Field(max_length=0, description="refused")] = None
    tools: Annotated[list[Any] | None, Field(max_length=0, description="refused")] = None
    store: bool | None = None
    metadata: Annotated[dict[str, Any] | None, Field(max_length=16)] = None
    user: Annotated[str | None, Field(max_length=256)] = None
    seed: Annotated[int | None, Field(ge=0, le=2**63 - 1)] = None

    def check(self) -> None:
        if self.text.format.type != "text":
            raise bad_request(
                f"text.format {self.text.format.type!r} is not supported by this server",
                "text.format",
                "unsupported",
            )
        if len(self.model_extra or {}) > 64:
            raise bad_request("at most 64 unknown fields are accepted", None)

    def messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.instructions:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            out.append({"role": "user", "content": self.input})
        else:
            out.extend(m.to_template() for m in self.input)
        return out
