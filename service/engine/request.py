"""Per-request state: validation, sampling parameters, and token -> event."""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.engine.output import TextAssembler
from service.engine.scheduler import Seq
from service.engine.types import (
    BadRequest,
    ContextLengthExceeded,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    SamplingParams,
    TokenLogprob,
    TokenOutOfVocabulary,
    Usage,
)

if TYPE_CHECKING:
    from model.sampling import SamplingRow


@dataclass(eq=False)
class RequestState:
    """What the engine keeps per request besides the scheduler's ``Sequence``."""

    params: SamplingParams
    seed: int
    text: TextAssembler
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    eos_ids: frozenset[int]
    stop_ids: frozenset[int] = field(init=False)
    arrival: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finalizer: weakref.finalize | None = None  # aborts a stream dropped unread
    matcher: Any = None  # the grammar matcher of a constrained request (structured.py)
    # the prompt tokens' logprobs (after the first token), taken from the prefill's logits
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        self.stop_ids = frozenset(self.params.stop_token_ids)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Raise ``TokenOutOfVocabulary`` for the first id outside ``[0, vocab_size)``."""
    for token in ids:
        if not 0 <= token < vocab_size:
            raise TokenOutOfVocabulary(token, vocab_size, param)


def validate_request(request: GenerateRequest, vocab_size: int, max_model_len: int) -> None:
    """Raise a ``RequestError`` for anything that must never reach the scheduler.

    This is the one check of a request's token ids, context length and sampling
    parameters: the scheduler, the sampler and the model trust them afterwards.
    """
    ids, p = request.prompt_token_ids, request.params
    if not ids:
        raise BadRequest("the prompt must not be empty", param="prompt")
    check_token_ids(ids, vocab_size, "prompt")
    check_token_ids(p.stop_token_ids, vocab_size, "stop_token_ids")
    if p.max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {p.max_tokens}", param="max_tokens")
    check_token_ids(list(p.logit_bias), vocab_size, "logit_bias")
    if not all(math.isfinite(v) for v in p.logit_bias.values()):
        raise BadRequest("logit_bias values must be finite", param="logit_bias")
    if not 0 <= p.min_tokens <= p.max_tokens:
        raise BadRequest(
            f"min_tokens must be in [0, max_tokens={p.max_tokens}], got {p.min_tokens}",
            param="min_tokens",
        )
    if len(ids) + p.max_tokens > max_model_len:
        raise ContextLengthExceeded(len(ids), p.max_tokens, max_model_len)
    checks = [
        (math.isfinite(p.temperature) and p.temperature >= 0, "temperature", "must be >= 0"),
        (p.top_k >= 0, "top_k", "must be >= 0"),
        (0.0 < p.top_p <= 1.0, "top_p", "must be in (0, 1]"),
        (0.0 <= p.min_p <= 1.0, "min_p", "must be in [0, 1]"),
        (
            math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0,
            "repetition_penalty",
            "must be > 0",
        ),
        (math.isfinite(p.presence_penalty), "presence_penalty", "must be finite"),
        (math.isfinite(p.frequency_penalty), "frequency_penalty", "must be finite"),
        (
            p.logprobs is None or 0 <= p.logprobs <= vocab_size,
            "logprobs",
            f"must be in [0, {vocab_size}]",
        ),
        (
            p.prompt_logprobs is None or 0 <= p.prompt_logprobs <= vocab_size,
            "prompt_logprobs",
            f"must be in [0, {vocab_size}]",
        ),
    ]
    for ok, name, rule in checks:
        if not ok:
            raise BadRequest(f"{name} {rule}", param=name)


def sampling_row(seq: Seq) -> SamplingRow:
    # Imported here: the HTTP layer imports this module for its checks, and PyTorch (which
    # model.sampling needs) then loads in the background with the model, not before the
    # server listens.
    from model.sampling import SamplingRow

    st: RequestState = seq.state
    p = st.params
    row = SamplingRow(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        seed=st.seed,
        step=seq.num_output_tokens,
        num_logprobs=p.logprobs,
        logit_bias=_bias(seq),
    )
    # Token lists only when a penalty reads them: copying them costs per step.
    if row.penalised:
        row.output_ids = seq.output_ids
        if p.repetition_penalty != 1.0:
            row.prompt_ids = seq.token_ids[: seq.num_prompt_tokens]
    return row


def _bias(seq: Seq) -> list[tuple[int, float]]:
    """The request's logit bias, and until ``min_tokens`` are out, a ban on ending."""
    st: RequestState = seq.state
    p = st.params
    bias = list(p.logit_bias.items())
    if seq.num_output_tokens < p.min_tokens:
        ends = st.stop_ids if p.ignore_eos else st.stop_ids | st.eos_ids
        bias.extend((token, -math.inf) for token in sorted(ends))
    return bias


def next_event(
    seq: Seq,
    token: int,
    logprob: TokenLogprob | None,
    max_model_len: int,
    eos_ids: frozenset[int] = frozenset(),
) -> GenerateEvent:
    """Append ``token`` to ``seq`` and say what it means for the client."""
    st: RequestState = seq.state
    p = st.params
    seq.token_ids.append(token)
    reason: FinishReason | None = None
    stop_reason: str | int | None = None
    grammar_done = False
    if st.matcher is not None:
        # The sampled token was allowed by the mask, so the matcher takes it; if it does
        # not, the request fails alone (RequestFailed) rather than emit invalid output.
        if not st.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {st.matcher.get_error()}")
        # Nothing but an end token can follow: finish now instead of spending a step on it.
        grammar_done = token not in eos_ids and st.matcher.is_stopped()
    if token in st.stop_ids:
        reason, stop_reason = "stop", token
        text, _ = st.text.flush()  # the stop token's own text is never emitted
    elif token in st.eos_ids and not p.ignore_eos:
        reason = "stop"
        text, _ = st.text.flush()
    else:
        text, matched = st.text.push(token)
        if matched is not None:
            reason, stop_reason = "stop", matched
        elif grammar_done:
            tail, _ = st.text.flush()
            text += tail
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= max_model_len:
            tail, matched = st.text.flush()
            text += tail
            reason, stop_reason = ("stop", matched) if matched is not None else ("length", None)
    event = GenerateEvent(
        request_id=seq.request_id,
        token_ids=[token],
        text=text,
        logprobs=[logprob] if logprob is not None else None,
        finish_reason=reason,
        stop_reason=stop_reason,
    )
    if reason is not None:
        event.usage = usage(seq)
    return event


def usage(seq: Seq) -> Usage:
    return Usage(
        prompt_tokens=seq.num_prompt_tokens,
        completion_tokens=seq.num_output_tokens,
        cached_tokens=seq.num_cached_tokens,
    )
