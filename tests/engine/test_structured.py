"""Constrained decoding in the engine, on a tiny random model with a byte tokenizer: outputs
always match their constraint, bad constraints fail before any event, unconstrained rows
sharing the batch are unchanged, compiles are cached."""

from __future__ import annotations

import asyncio
import json
import re
import time

import jsonschema
import pytest

from bench.structured_schemas import SCHEMAS
from service.engine.types import (
    BadRequest,
    Constraint,
    GenerateEvent,
    GenerateRequest,
    SamplingParams,
)
from tests.engine.engine_testlib import (
    collect,
    greedy,
    make_engine,
    metric,
    prompt_of,
    run,
    text_of,
    tokens_of,
)


def params(constraint: Constraint | None, temperature: float = 1.0, seed: int = 0, n: int = 400):
    return SamplingParams(max_tokens=n, temperature=temperature, seed=seed, constraint=constraint)


def schema(name: str) -> Constraint:
    return Constraint("json_schema", json.dumps(SCHEMAS[name]), "json_schema")


def test_every_test_schema_yields_valid_json_greedy_and_sampled() -> None:
    engine = make_engine()

    async def main() -> None:
        jobs = [
            collect(engine, prompt_of(i, 8), params(schema(name), t, seed=i))
            for i, name in enumerate(SCHEMAS)
            for t in (0.0, 1.0)
        ]
        results = await asyncio.gather(*jobs)
        for (name, t), events in zip(
            [(n, t) for n in SCHEMAS for t in (0.0, 1.0)], results, strict=True
        ):
            assert events[-1].finish_reason == "stop", (name, t, text_of(events))
            jsonschema.validate(json.loads(text_of(events)), SCHEMAS[name])

    run(engine, main)
    assert metric(engine, "gptserve_constrained_requests_total", kind="json_schema") == 14
    # Each schema compiled once: the second request of each pair found it cached.
    assert metric(engine, "gptserve_constraint_cache_hits_total") == 7
    assert metric(engine, "gptserve_constraint_compile_seconds_count") == 7


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        (Constraint("regex", r"[a-z]{3}-[0-9]{2,4}"), r"[a-z]{3}-[0-9]{2,4}"),
        (Constraint("choice", json.dumps(["yes", "no", 'say "hi"'])), r'yes|no|say "hi"'),
        (Constraint("grammar", 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/'), None),
        (Constraint("json_object", '{"type":"object"}'), None),
    ],
)
def test_regex_choice_grammar_and_json_object(constraint: Constraint, check: str | None) -> None:
    engine = make_engine()

    async def main() -> list[tuple[str, str | None]]:
        jobs = [collect(engine, prompt_of(s, 6), params(constraint, 1.0, s, 200)) for s in range(4)]
        return [(text_of(ev), ev[-1].finish_reason) for ev in await asyncio.gather(*jobs)]

    for text, reason in run(engine, main):
        if constraint.kind == "grammar":
            assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", text), text
        elif constraint.kind == "json_object":
            # Nothing bounds a free object's strings: a random model may run out of tokens.
            assert text.startswith("{"), text
            if reason == "stop":
                assert isinstance(json.loads(text), dict), text
        else:
            assert check is not None and re.fullmatch(check, text), text


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (Constraint("regex", "([a-z", "guided_regex"), "unclosed"),
        (Constraint("json_schema", '{"type": "strin"}', "response_format"), "strin"),
        (Constraint("json_schema", "{not json", "json_schema"), "not valid JSON"),
        (Constraint("grammar", "start: nothing_here", "grammar"), "nothing_here"),
        (Constraint("choice", "[]", "choice"), "1 to"),
        (Constraint("json_schema", '{"a":' * 40 + "1" + "}" * 40, "json_schema"), "deeper"),
    ],
)
def test_a_bad_constraint_fails_before_any_event_naming_its_field(
    constraint: Constraint, message: str
) -> None:
    engine = make_engine()

    async def main() -> None:
        with pytest.raises(BadRequest) as caught:
            await collect(engine, prompt_of(1, 4), params(constraint))
        assert caught.value.param == constraint.param
        assert message in caught.value.message
        # The engine goes on serving.
        events = await collect(engine, prompt_of(2, 4), greedy(4))
        assert events[-1].finish_reason == "length"

    run(engine, main)


def test_a_compile_past_the_timeout_is_a_bad_request(monkeypatch) -> None:
    """A compile slower than the timeout (made slow here, so that a busy machine cannot
    finish it first) is the request's 400; the engine serves on."""
    engine = make_engine(structured_compile_timeout=0.05)
    compile_ = engine.grammars._compile

    def slow(constraint):
        time.sleep(0.5)
        return compile_(constraint)

    monkeypatch.setattr(engine.grammars, "_compile", slow)

    async def main() -> None:
        with pytest.raises(BadRequest, match="did not compile within 0.05 s"):
            await collect(engine, prompt_of(1, 4), params(schema("nested")))
        monkeypatch.setattr(engine.grammars, "_compile", compile_)
        assert tokens_of(await collect(engine, prompt_of(1, 4), greedy(3)))

    run(engine, main)


def test_unconstrained_greedy_rows_are_the_same_alone_and_beside_constrained_ones() -> None:
    prompts = [prompt_of(100 + i, 5 + i) for i in range(3)]

    async def alone(engine_) -> list[list[int]]:
        out = []
        for p in prompts:
            out.append(tokens_of(await collect(engine_, p, greedy(24))))
        return out

    engine = make_engine()
    want = run(engine, lambda: alone(engine))

    engine = make_engine()

    async def mixed() -> list[list[int]]:
        plain = [collect(engine, p, greedy(24)) for p in prompts]
        constrained = [
            collect(engine, prompt_of(200 + i, 7), params(schema(name), 1.0, i))
            for i, name in enumerate(["person", "array", "nested", "refs"])
        ]
        results = await asyncio.gather(*plain, *constrained)
        return [tokens_of(ev) for ev in results[: len(prompts)]]

    assert run(engine, mixed) == want


def test_n_choices_each_get_their_own_matcher() -> None:
    engine = make_engine()
    constraint = schema("enums")

    async def main() -> list[str]:
        reqs = [GenerateRequest(prompt_of(3, 5), params(constraint, 1.0, s)) for s in range(6)]

        async def one(r: GenerateRequest) -> str:
            return "".join([ev.text async for ev in engine.generate(r)])

        return await asyncio.gather(*(one(r) for r in reqs))

    for text in run(engine, main):
        jsonschema.validate(json.loads(text), SCHEMAS["enums"])


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_token_masks_set_exactly_the_disallowed_tokens_to_minus_inf(path: str) -> None:
    """A step's masks on the rows that carry them, bit j % 32 of word j // 32 for token
    j, over a vocabulary that is not a multiple of 32; other rows untouched. The C
    kernel (contiguous float32 logits on the CPU) and the PyTorch fallback alike."""
    from concurrent.futures import Future

    import numpy as np
    import torch

    from service.engine.structured import MaskJob

    rng = np.random.default_rng(0)
    width, words, rows = 100, 4, [3, 1]
    bitmask = rng.integers(-(2**31), 2**31, size=(len(rows), words), dtype=np.int64).astype(
        np.int32
    )
    bitmask[1, :] = -1  # a row with every token allowed
    bitmask[0, 1] = 0  # and a word with none
    logits = torch.randn(5, width)
    expected = logits.clone()
    for i, r in enumerate(rows):
        for j in range(width):
            if not (int(bitmask[i, j // 32]) & 0xFFFFFFFF) >> (j % 32) & 1:
                expected[r, j] = float("-inf")
    done: Future[None] = Future()
    done.set_result(None)
    target = logits if path == "kernel" else logits.t().contiguous().t()  # not contiguous
    MaskJob(rows, bitmask, done, width).apply(target)
    assert torch.equal(target, expected)
    assert torch.isinf(expected[3]).any() and not torch.isinf(expected[1]).any()


def test_constrained_rows_compute_a_mask_only_when_the_grammar_refuses_their_draw(
    monkeypatch,
) -> None:
    """On the CPU a constrained row whose sampling commutes with the mask first draws
    over the whole vocabulary: when the grammar takes that token it is also the draw
    over the allowed tokens (same seed, same noise), and no mask is computed. Greedy
    and sampled rows give exactly the tokens of the masked path; rows with top-p (whose
    nucleus depends on the mask) are masked at every step."""
    from service.engine.structured import MaskWorker

    masked_rows: list[int] = []
    start = MaskWorker.start

    def counting(self, rows, matchers):  # type: ignore[no-untyped-def]
        masked_rows.extend(rows)
        return start(self, rows, matchers)

    monkeypatch.setattr(MaskWorker, "start", counting)

    def generate(cases, guess: bool) -> tuple[list[list[int]], int]:  # type: ignore[no-untyped-def]
        engine = make_engine()
        if not guess:
            monkeypatch.setattr(engine, "_guess_rows", lambda chunks: frozenset())
        masked_rows.clear()

        async def main() -> list[list[GenerateEvent]]:
            jobs = [collect(engine, prompt_of(300 + i, 6), p) for i, (p, _) in enumerate(cases)]
            return await asyncio.gather(*jobs)

        results = run(engine, main)
        for (_, check), events in zip(cases, results, strict=True):
            check(text_of(events))
        return [tokens_of(ev) for ev in results], len(masked_rows)

    def valid(name: str):  # type: ignore[no-untyped-def]
        return lambda text: jsonschema.validate(json.loads(text), SCHEMAS[name])

    # A grammar that takes most draws (any text; the tiny model's byte tokens that are
    # not UTF-8 on their own are refused): fewer masks than steps, the same tokens.
    anything = Constraint("regex", "[\\s\\S]{0,40}", "regex")
    for temperature in (0.0, 1.0):
        case = [(params(anything, temperature, seed=5, n=40), lambda text: None)]
        tokens, masks = generate(case, guess=True)
        assert generate(case, guess=False) == (tokens, len(tokens[0]))
        assert masks < len(tokens[0]), (temperature, masks, len(tokens[0]))

    # JSON schemas, greedy and sampled side by side: whatever is guessed, the tokens
    # equal the masked path's and the JSON validates.
    schemas = [
        (params(schema(name), temperature, seed=i), valid(name))
        for i, (name, temperature) in enumerate([("person", 0.0), ("nested", 1.0), ("array", 0.7)])
    ]
    with_guess, masks_with = generate(schemas, guess=True)
    without_guess, masks_without = generate(schemas, guess=False)
    assert with_guess == without_guess
    assert masks_with <= masks_without

    # top-p: a mask at every step
    top_p = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=3, constraint=anything)
    tokens, masks = generate([(top_p, lambda text: None)], guess=True)
    assert masks == len(tokens[0])
