"""Pieces shared by the native and OpenAI schemas: a strict base, bounded types, usage."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from service.engine.types import Constraint, SamplingParams
from service.settings import (
    HARD_MAX_LOGPROBS,
    HARD_MAX_N,
    HARD_MAX_STOP,
    HARD_MAX_STOP_LENGTH,
    HARD_MAX_TOKENS,
)

TOKEN_ID_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1
MAX_TEXT_CHARS = 4 * 1024 * 1024  # the body limit binds first; this keeps the schema bounded
MAX_TOKEN_LIST = 1 << 20


class StrictModel(BaseModel):
    """Request bodies: unknown fields are a 400, types are not coerced, NaN and inf are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ResponseModel(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)


NonEmptyText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_TOKEN_LIST)]
StopString = Annotated[str, Field(max_length=HARD_MAX_STOP_LENGTH)]
StopList = Annotated[list[StopString], Field(max_length=HARD_MAX_STOP)]
StopTokenIds = Annotated[list[TokenId], Field(max_length=HARD_MAX_STOP)]

MaxTokens = Annotated[
    int | None, Field(ge=1, le=HARD_MAX_TOKENS, description="tokens to generate at most")
]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy")]
TopK = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX, description="0 turns it off")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0, description="1 turns it off")]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[int | None, Field(ge=0, le=SEED_MAX)]
TopLogprobs = Annotated[int | None, Field(ge=0, le=HARD_MAX_LOGPROBS)]
ChoiceCount = Annotated[int, Field(ge=1, le=HARD_MAX_N)]
ParseSpecial = Annotated[
    bool,
    Field(
        description="false (the default): special-token spellings in the text, such as "
        "<|im_start|>, are plain text; true: they become control tokens"
    ),
]


class UsageOut(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SamplingFields(StrictModel):
    """Sampling knobs shared by /generate, /v1/completions and /v1/chat/completions."""

    temperature: Temperature = 1.0
    top_k: TopK = 0
    top_p: TopP = 1.0
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stop_token_ids: StopTokenIds = Field(default_factory=list)
    seed: Seed = None
    ignore_eos: bool = False

    @property
    def stop_list(self) -> list[str]:
        """The stop strings, however the dialect spells them."""
        return []

    @property
    def engine_logprobs(self) -> int | None:
        """Top-n logprobs per token for the engine; None: no logprobs."""
        return None

    def engine_constraint(self) -> Constraint | None:
        """The output constraint (structured output); the bodies that take one override it."""
        return None

    def to_sampling_params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        """The engine's parameters for choice ``choice`` of this request."""
        # Distinct seeds per choice, or n seeded choices would all be the same text.
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop_list,
            stop_token_ids=list(self.stop_token_ids),
            seed=seed,
            logprobs=self.engine_logprobs,
            ignore_eos=self.ignore_eos,
            constraint=self.engine_constraint(),
        )
