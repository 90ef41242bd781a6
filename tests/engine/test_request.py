"""The engine's one check of a request: sampling parameters, token ids, context length.

The sampler, the scheduler and the model trust what passes it.
"""

from __future__ import annotations

import math

import pytest

from service.engine.request import check_token_ids, validate_request
from service.engine.types import (
    BadRequest,
    ContextLengthExceeded,
    GenerateRequest,
    SamplingParams,
    TokenOutOfVocabulary,
)

VOCAB = 10
CONTEXT = 32


def check(prompt: list[int] | None = None, **params) -> None:
    params.setdefault("max_tokens", 4)
    request = GenerateRequest(prompt if prompt is not None else [1, 2], SamplingParams(**params))
    validate_request(request, VOCAB, CONTEXT)


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", math.nan),
        ("frequency_penalty", math.inf),
        ("logprobs", -1),
        ("logprobs", VOCAB + 1),
    ],
)
def test_rejects_invalid_sampling_parameters(param: str, value: float) -> None:
    with pytest.raises(BadRequest) as err:
        check(**{param: value})
    assert err.value.param == param


def test_accepts_the_edges() -> None:
    check(temperature=0.0, top_p=1.0, min_p=1.0, logprobs=VOCAB, stop_token_ids=[VOCAB - 1])
    check(prompt=[0] * (CONTEXT - 4), max_tokens=4)


@pytest.mark.parametrize(
    ("prompt", "stop_ids", "param"),
    [([1, VOCAB], [], "prompt"), ([-1], [], "prompt"), ([1], [VOCAB], "stop_token_ids")],
)
def test_rejects_out_of_vocabulary_ids(prompt, stop_ids, param) -> None:
    with pytest.raises(TokenOutOfVocabulary) as err:
        check(prompt=prompt, stop_token_ids=stop_ids)
    assert err.value.param == param
    assert err.value.code == "token_out_of_vocabulary"
    assert str(VOCAB) in err.value.message


def test_check_token_ids_names_the_first_bad_id() -> None:
    check_token_ids([0, 9], VOCAB, "tokens")
    with pytest.raises(TokenOutOfVocabulary, match="token id 12 "):
        check_token_ids([3, 12, 99], VOCAB, "tokens")


def test_context_length_blames_what_does_not_fit() -> None:
    with pytest.raises(ContextLengthExceeded) as err:
        check(prompt=[1] * 30, max_tokens=3)
    assert err.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceeded) as err:
        check(prompt=[1] * CONTEXT, max_tokens=1)
    assert err.value.param == "prompt"


def test_rejects_an_empty_prompt_and_no_tokens_to_generate() -> None:
    with pytest.raises(BadRequest):
        check(prompt=[])
    with pytest.raises(BadRequest):
        check(max_tokens=0)
