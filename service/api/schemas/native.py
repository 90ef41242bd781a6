"""Request and response bodies of the native routes: /generate, /embed, /tokenize, /detokenize."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from service.api.schemas.common import (
    MAX_TEXT_CHARS,
    MaxTokens,
    MinP,
    Penalty,
    RepetitionPenalty,
    ResponseModel,
    Seed,
    StopList,
    StopTokenIds,
    StrictModel,
    Temperature,
    TokenIds,
    TopK,
    TopLogprobs,
    TopP,
    UsageOut,
)
from service.api.serving import Limits, check_cap, check_stop, check_token_ids
from service.engine.types import SamplingParams
from service.settings import HARD_MAX_BATCH


class GenerateBody(StrictModel):
    """``POST /generate``: sampling parameters are flat; every number is bounded."""

    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    max_tokens: MaxTokens = None
    temperature: Temperature = 1.0
    top_k: TopK = 0
    top_p: TopP = 1.0
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stop: StopList = Field(
        default_factory=list, description="strings that end generation (never emitted)"
    )
    stop_token_ids: StopTokenIds = Field(default_factory=list)
    seed: Seed = None
    logprobs: TopLogprobs = Field(
        None, description="return each token's logprob and the top n alternatives"
    )
    ignore_eos: bool = False
    stream: bool = False
    return_token_ids: bool = Field(False, description="include the generated token ids")

    def check(self, limits: Limits) -> None:
        check_stop(self.stop, limits)
        check_token_ids(self.stop_token_ids, limits, "stop_token_ids")
        check_cap(self.logprobs, limits.max_logprobs, "logprobs")

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            seed=self.seed,
            logprobs=self.logprobs,
            ignore_eos=self.ignore_eos,
        )


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


EmbedText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class EmbedBody(StrictModel):
    """``POST /embed``: one text or a batch of texts."""

    input: EmbedText | Annotated[list[EmbedText], Field(min_length=1, max_length=HARD_MAX_BATCH)]
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
    text: str = Field(max_length=MAX_TEXT_CHARS)
    add_special_tokens: bool = True


class TokenizeOut(ResponseModel):
    tokens: list[int]
    count: int


class DetokenizeBody(StrictModel):
    tokens: TokenIds
    skip_special_tokens: bool = True


class DetokenizeOut(ResponseModel):
    text: str


class InfoOut(ResponseModel):
    model: str
    version: str
    max_model_len: int
    dtype: str
    device: str
    config: dict[str, Any]
    limits: dict[str, int]
