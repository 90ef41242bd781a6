"""The engine's interface: request and event types, errors, and the client protocol.

These are plain dataclasses. The HTTP layer converts its pydantic models into
them; the engine never sees pydantic, FastAPI or Starlette objects.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from model.chat_template import FinalMessageNotShown as FinalMessageNotShown

# The chat template's errors, re-exported for the API layer.
from model.chat_template import TemplateError as TemplateError
from model.chat_template import TemplateRaised as TemplateRaised

FinishReason = Literal["stop", "length", "abort", "error"]
Pooling = Literal["mean", "last"]
ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match (constrained decoding, ``structured.py``).

    ``text`` is a JSON schema (``json_schema``; ``json_object`` takes ``{"type":
    "object"}``), a regular expression, a JSON list of strings (``choice``) or a Lark
    grammar (``grammar``, llguidance's dialect). ``param`` names the request field
    it came from, for error messages; it is not part of the constraint's identity.
    """

    kind: ConstraintKind
    text: str
    param: str = field(default="constraint", compare=False)


@dataclass
class SamplingParams:
    """Per-request generation parameters. The HTTP layer bounds every number."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # never emitted
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # None: the engine draws one
    logprobs: int | None = None  # None: none; n: the chosen token's plus the top n
    ignore_eos: bool = False
    constraint: Constraint | None = None  # None: unconstrained
    # -- what other servers' clients send (vLLM's names) --
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many are generated
    skip_special_tokens: bool = True  # in the text deltas
    prompt_logprobs: int | None = None  # None: none; n: each prompt token's plus the top n


@dataclass
class GenerateRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first
    rank: int | None = None  # 1 + how many tokens the model found likelier (prompt logprobs)


@dataclass
class GenerateEvent:
    """What one engine step produced for one request.

    ``text`` is a valid UTF-8 delta (possibly empty while a multi-byte
    character or a possible stop string is held back). The last event of a
    request has ``finish_reason`` and ``usage`` set.
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    usage: Usage | None = None
    # On a request's first event when it asked for them: one entry per prompt token,
    # the first None (nothing precedes it), each with ``rank`` set.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EmbedResult:
    embeddings: list[list[float]]
    prompt_tokens: int


# -- errors -------------------------------------------------------------------------


class EngineError(Exception):
    """Base of everything the engine raises on purpose."""


class RequestError(EngineError):
    """A problem with one request; the engine and other requests are fine."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(RequestError):
    code = "invalid_request"


class ContextLengthExceeded(BadRequest):
    """Prompt plus max_tokens does not fit the context; the message names both numbers."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        super().__init__(
            f"this model's context is {context} tokens, but the prompt has {prompt_tokens} tokens "
            f"and max_tokens is {max_tokens} ({prompt_tokens + max_tokens} in all)",
            # A prompt that leaves room for a token is fine: then max_tokens asks too much.
            param="prompt" if prompt_tokens >= context else "max_tokens",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context = context


class TokenOutOfVocabulary(BadRequest):
    """A token id outside the model's vocabulary; the message names the id and the size."""

    code = "token_out_of_vocabulary"

    def __init__(self, token: int, vocab_size: int, param: str) -> None:
        super().__init__(
            f"token id {token} is out of vocabulary (the vocabulary has {vocab_size} tokens)",
            param=param,
        )


class QueueFull(RequestError):
    """The waiting queue is at its bound; retry after ``retry_after`` seconds."""

    code = "queue_full"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(RequestError):
    """The engine failed this request alone (an error while sampling or detokenizing
    it); raised from its event iterator. Other requests and the engine go on. This
    is a server-side fault (HTTP 500), not a client mistake."""

    code = "internal_error"


class EngineUnavailable(EngineError):
    """Not started yet, or draining: new requests are refused (HTTP 503)."""


class EngineDead(EngineError):
    """The engine loop died; the process should be restarted by its supervisor."""


# -- the interface the HTTP layer uses ---------------------------------------------


class TokenizerLike(Protocol):
    vocab_size: int
    eos_token_ids: frozenset[int]

    def encode(
        self, text: str, add_special_tokens: bool = True, parse_special: bool = False
    ) -> list[int]: ...

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> tuple[str, list[int]]:
        """The rendered conversation and its ids; only the template's markers are
        control tokens (``kwargs``: more template variables). Raises ``TemplateRaised``
        or another ``TemplateError``, or ``FinalMessageNotShown``."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str: ...


class EngineClient(Protocol):
    model_name: str
    max_model_len: int

    @property
    def tokenizer(self) -> TokenizerLike: ...

    def start(self) -> None: ...

    async def stop(self, drain_timeout: float = 30.0) -> None: ...

    async def encode(
        self, text: str, add_special_tokens: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Tokenize off the event loop; special-token spellings are plain text unless
        ``parse_special``."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        """The request's events; closing the stream aborts the request."""
        ...

    async def embed(
        self,
        inputs: Sequence[str | Sequence[int]],
        pooling: Pooling = "mean",
        normalize: bool = True,
    ) -> EmbedResult: ...

    def abort(self, request_id: str) -> None: ...

    def check_health(self) -> None:
        """Raise EngineDead if the loop has died."""
        ...
