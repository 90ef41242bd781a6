"""Structured output and tool calling on the real server with the default model, through
httpx, the official openai client and langchain-openai."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from bench.structured_schemas import SCHEMAS
from tests.integration.live_server import MODEL

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": SCHEMAS["tool_call"]["anyOf"][0]["properties"]["arguments"],
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": SCHEMAS["tool_call"]["anyOf"][1]["properties"]["arguments"],
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tools."}]


@pytest.fixture(scope="module")
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def _generate(server: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{server}/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_every_test_schema_validates_at_temperature_0_and_1(server: str) -> None:
    jobs = [
        (name, {"prompt": f"A {name} as JSON:", "json_schema": schema, "max_tokens": 120,
                "temperature": t, "seed": seed})
        for name, schema in SCHEMAS.items()
        for t, seed in ((0.0, 0), (1.0, 1))
    ]  # fmt: skip
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: they share the batch
        results = list(pool.map(lambda job: _generate(server, job[1]), jobs))
    for (name, _), out in zip(jobs, results, strict=True):
        assert out["finish_reason"] == "stop", (name, out)
        jsonschema.validate(json.loads(out["text"]), SCHEMAS[name])


def test_regex_choice_and_grammar_on_generate(server: str) -> None:
    out = _generate(server, {"prompt": "A date:", "regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert len(out["text"]) == 10 and out["text"].startswith("20"), out
    out = _generate(server, {"prompt": "Is the sky blue?", "choice": ["yes", "no"]})
    assert out["text"] in ("yes", "no")
    grammar = 'start: "The answer is " NUM "."\nNUM: /[0-9]{1,4}/'
    out = _generate(server, {"prompt": "2+2?", "grammar": grammar, "temperature": 0})
    assert out["text"].startswith("The answer is ") and out["text"].endswith("."), out


def test_unconstrained_greedy_text_is_the_same_alone_and_beside_constrained(server: str) -> None:
    plain = {"prompt": "The three primary colours are", "max_tokens": 24, "temperature": 0}
    alone = _generate(server, plain)["text"]
    constrained = [
        {"prompt": "JSON:", "json_schema": SCHEMAS[n], "max_tokens": 120, "temperature": 1,
         "seed": i}
        for i, n in enumerate(["person", "nested", "array", "refs"])
    ]  # fmt: skip
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(_generate, server, b) for b in [*constrained, plain]]
        results = [f.result() for f in futures]
    assert results[-1]["text"] == alone


def test_openai_response_format_json_object_and_json_schema(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    else:  # nothing bounds a free object: only its start is certain
        assert (r.choices[0].message.content or "").startswith("{")
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a person."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMAS["person"], "strict": True},
        },
        max_tokens=120,
        temperature=0,
    )
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), SCHEMAS["person"])


def test_guided_extra_body_on_completions(oai: openai.OpenAI) -> None:
    r = oai.completions.create(
        model=MODEL,
        prompt="Pick a colour:",
        max_tokens=8,
        extra_body={"guided_choice": ["red", "green", "blue"]},
    )
    assert r.choices[0].text in ("red", "green", "blue")
    r = oai.completions.create(
        model=MODEL,
        prompt="A number:",
        max_tokens=8,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}"}},
    )
    assert len(r.choices[0].text) == 3 and r.choices[0].text.isdigit()


def _call(message: Any) -> tuple[str, dict[str, Any]]:
    [call] = message.tool_calls
    assert call.type == "function" and call.id
    return call.function.name, json.loads(call.function.arguments)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_named_and_required_tool_choice_always_yield_a_valid_call(
    oai: openai.OpenAI, temperature: float
) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        r = oai.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER, ADD],
            tool_choice=choice,  # type: ignore[arg-type]
            parallel_tool_calls=False,
            max_tokens=120,
            temperature=temperature,
            seed=7,
        )
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.content is None
        name, args = _call(r.choices[0].message)
        if choice != "required":
            assert name == "add"
        tool = WEATHER if name == "get_weather" else ADD
        jsonschema.validate(args, tool["function"]["parameters"])


def test_a_streamed_tool_call_accumulates_to_the_non_streamed_one(oai: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
        parallel_tool_calls=False, max_tokens=120, temperature=0,
    )  # fmt: skip
    whole = oai.chat.completions.create(**kwargs)
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in oai.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                acc = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                acc["id"] = delta.id or acc["id"]
                if delta.function is not None:
                    acc["name"] += delta.function.name or ""
                    acc["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    want = [
        (c.function.name, json.loads(c.function.arguments))
        for c in whole.choices[0].message.tool_calls or []
    ]
    got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    assert got == want and all(c["id"] for c in calls.values())


def test_tool_results_in_the_conversation_are_accepted(oai: openai.OpenAI) -> None:
    args = json.dumps({"city": "Paris", "unit": "celsius"})
    messages: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": args}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]  # fmt: skip
    r = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=16
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.tool_calls is None


def test_langchain_bind_tools_and_with_structured_output(server: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL, base_url=f"{server}/v1", api_key="unused", temperature=0,
        max_tokens=120, max_retries=0, timeout=300,
    )  # fmt: skip

    class Person(BaseModel):
        """A person."""

        name: str = Field(max_length=24)
        age: int = Field(ge=0, le=120)

    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Invent a person.")
        assert isinstance(person, Person)

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    message = llm.bind_tools([add], tool_choice="add").invoke("What is 2 plus 3?")
    [call] = message.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    streamed = None
    for chunk in llm.bind_tools([add], tool_choice="add").stream("What is 2 plus 3?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.tool_calls[0]["args"] == call["args"]


BAD = [
    ("/generate", {"prompt": "x", "regex": "([a-z"}, "regex"),
    ("/generate", {"prompt": "x", "json_schema": {"type": "strin"}}, "json_schema"),
    ("/generate", {"prompt": "x", "regex": "a", "choice": ["a"]}, "choice"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "(["}, "guided_regex"),
    (
        "/v1/chat/completions",
        {"messages": ASK, "response_format": {"type": "json_schema",
         "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "x"}}}},
        "response_format.json_schema.schema",
    ),
    (
        "/v1/chat/completions",
        {"messages": ASK, "tools": [{"type": "function", "function": {"parameters": {}}}]},
        "tools.0.function.name",
    ),
    (
        "/v1/chat/completions",
        {"messages": ASK, "tools": [WEATHER],
         "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {"messages": ASK, "tool_choice": "required"},
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {"messages": ASK, "guided_json": {"type": "object"}, "guided_regex": "a"},
        "guided_regex",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), BAD)
def test_bad_constraints_and_tools_are_400s_naming_the_field(
    server: str, path: str, body: dict[str, Any], param: str
) -> None:
    if path != "/generate":
        body = {"model": MODEL, **body}
    for stream in (False, True):
        r = httpx.post(f"{server}{path}", json={**body, "stream": stream}, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["message"], error


def test_metrics_count_constrained_requests_and_compiles(server: str) -> None:
    _generate(server, {"prompt": "x", "choice": ["metrics-a", "metrics-b"]})
    _generate(server, {"prompt": "y", "choice": ["metrics-a", "metrics-b"]})
    text = httpx.get(f"{server}/metrics", timeout=30).text
    samples = {
        (s.name, s.labels.get("kind")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("gptserve_constrained_requests_total", "choice")] >= 2
    assert samples[("gptserve_constraint_cache_hits_total", None)] >= 1
    assert samples[("gptserve_constraint_compile_seconds_count", None)] >= 1
