"""Fields that other servers' clients send (vLLM's extensions, the OpenAI SDK's newer
fields), and the policy for fields nobody declared.

Unknown fields follow vLLM: accepted and ignored, logged once per name, and
listed in the ``X-Ignored-Fields`` response header, except the few in
``REFUSED_UNKNOWN`` whose silent omission would change what the client gets
(a tool call, a JSON answer, a beam search): those stay a 400 that names them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from service.api.errors import bad_request
from service.api.schemas.common import StrictModel
from service.api.serving import Limits, check_cap
from service.engine.types import SamplingParams
from service.settings import HARD_MAX_LOGPROBS

logger = logging.getLogger(__name__)

# Request bodies of the OpenAI-style routes: strict types, unknown fields allowed (then ignored).
LENIENT = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

MAX_LOGIT_BIAS = 1024  # entries (OpenAI allows 300)
MAX_UNKNOWN_FIELDS = 64
MAX_TEMPLATE_KWARGS = 64
IGNORED_HEADER = "X-Ignored-Fields"

# Unknown fields refused outright: ignoring them would silently change the answer's meaning.
REFUSED_UNKNOWN = frozenset(
    {
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "structured_outputs",
        "chat_template",
        "suffix",
        "beam_width",
        "allowed_token_ids",
        "bad_words",
    }
)
REFUSED_PREFIXES = ("guided_",)

_logged: set[str] = set()
_LOG_NAMES_MAX = 1024

LogitBias = Annotated[
    dict[
        Annotated[str, Field(max_length=16)],
        Annotated[float, Field(ge=-100.0, le=100.0)],
    ]
    | None,
    Field(max_length=MAX_LOGIT_BIAS, description="token id -> bias added to its logit"),
]
PromptLogprobs = Annotated[int | None, Field(ge=0, le=HARD_MAX_LOGPROBS)]
TruncatePrompt = Annotated[int | None, Field(ge=1, le=1 << 20)]
MinTokens = Annotated[int, Field(ge=0, le=1 << 20)]
ShortText = Annotated[str | None, Field(max_length=256)]


class ClientFields(StrictModel):
    """Honoured: vLLM's extensions clients rely on. Ignored (accepted so that clients that
    always send them work): ``store``, ``metadata``, ``service_tier``, ``reasoning_effort``,
    ``spaces_between_special_tokens`` (no effect on a byte-level tokenizer),
    ``length_penalty`` (only beam search reads it)."""

    logit_bias: LogitBias = None
    min_tokens: MinTokens = 0
    return_token_ids: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: TruncatePrompt = None
    prompt_logprobs: PromptLogprobs = None
    use_beam_search: bool = False
    length_penalty: Annotated[float, Field(ge=-10.0, le=10.0)] = 1.0
    store: bool | None = None
    metadata: Annotated[
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None,
        Field(max_length=16),
    ] = None
    service_tier: ShortText = None
    reasoning_effort: ShortText = None

    def check_dialect(self, limits: Limits) -> None:
        check_cap(self.prompt_logprobs, limits.max_logprobs, "prompt_logprobs")
        if self.use_beam_search:
            raise bad_request(
                "beam search is not supported by this server", "use_beam_search", "unsupported"
            )
        for key in self.logit_bias or {}:
            if not key.isdigit():
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        if (
            self.truncate_prompt_tokens is not None
            and self.truncate_prompt_tokens >= limits.context
        ):
            raise bad_request(
                f"truncate_prompt_tokens must be below the context of {limits.context}",
                "truncate_prompt_tokens",
            )

    def with_dialect(self, params: SamplingParams, prompt_logprobs: int | None) -> SamplingParams:
        return dataclasses.replace(
            params,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            min_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens,
            prompt_logprobs=prompt_logprobs,
        )


def ignored_fields(body: BaseModel) -> list[str]:
    """The undeclared fields of ``body``, to be ignored; a 400 for those that must not be."""
    names = sorted(body.model_extra or {})
    if len(names) > MAX_UNKNOWN_FIELDS:
        raise bad_request(f"at most {MAX_UNKNOWN_FIELDS} unknown fields are accepted", None)
    for name in names:
        if name in REFUSED_UNKNOWN or name.startswith(REFUSED_PREFIXES):
            raise bad_request(f"'{name}' is not supported by this server", name, code="unsupported")
    for name in names:
        if name not in _logged and len(_logged) < _LOG_NAMES_MAX:
            _logged.add(name)
            logger.warning("ignoring the unknown request field %r (logged once)", name)
    return names


def ignored_header(names: list[str]) -> dict[str, str]:
    return {IGNORED_HEADER: ", ".join(n[:64] for n in names)[:2048]} if names else {}


def template_kwargs(value: dict[str, Any] | None) -> dict[str, Any]:
    """``chat_template_kwargs`` minus the names the renderer sets itself."""
    reserved = {"messages", "add_generation_prompt", "tools", "bos_token", "eos_token"}
    return {k: v for k, v in (value or {}).items() if k not in reserved}
