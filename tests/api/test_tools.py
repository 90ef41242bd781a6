"""Tool calling helpers: the forced-call constraint, the fallback prompt, parsing replies."""

from __future__ import annotations

import json

import jsonschema
import pytest

from service.api.tools import ToolPlan, fallback_messages, may_become_call, parse_tool_calls

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}


def plan(mode: str = "auto", name: str | None = None, parallel: bool = True) -> ToolPlan:
    return ToolPlan([ADD, NOW], mode, name, parallel)


@pytest.mark.parametrize(
    "text",
    [
        '[{"name": "add", "arguments": {"a": 1, "b": 2}}]',
        '{"name": "add", "arguments": {"a": 1, "b": 2}}',
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        '  {"name": "add", "parameters": {"a": 1, "b": 2}}  ',
        '{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}',
    ],
)
def test_replies_that_are_calls_parse_to_openai_tool_calls(text: str) -> None:
    calls = parse_tool_calls(text, plan())
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 3.",
        '[{"name": "sub", "arguments": {}}]',  # not one of the tools
        '{"name": "add", "arguments": [1, 2]}',
        '[{"name": "add", "arguments": {"a": 1}}, "x"]',
        '<tool_call>{"name": "add", "arguments": {}}</tool_call> and some text',
        '{"name": "add", "arguments": {"a": 1',  # cut short
        "",
    ],
)
def test_replies_that_are_not_calls_stay_text(text: str) -> None:
    assert parse_tool_calls(text, plan()) is None


def test_the_forced_constraint_accepts_valid_calls_only() -> None:
    constraint = plan("required").constraint()
    assert constraint is not None and constraint.kind == "json_schema"
    schema = json.loads(constraint.text)
    jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}}], schema)
    jsonschema.validate(
        [{"name": "now", "arguments": {}}, {"name": "now", "arguments": {}}], schema
    )
    for bad in ([], [{"name": "add", "arguments": {"a": 1}}], [{"name": "x", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    forced = plan("named", "now", parallel=False).constraint()
    assert forced is not None
    named = json.loads(forced.text)
    jsonschema.validate([{"name": "now", "arguments": {}}], named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}}], named)
    with pytest.raises(jsonschema.ValidationError):  # one call only
        jsonschema.validate([{"name": "now", "arguments": {}}] * 2, named)
    assert plan("auto").constraint() is None


def test_the_fallback_renders_tools_calls_and_results_as_plain_messages() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+2?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "add", "arguments": {"a": 1, "b": 2}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    out = fallback_messages(messages, plan("required"))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"name": "add"' in out[0]["content"]
    assert "must call at least one function" in out[0]["content"]
    assert json.loads(out[2]["content"]) == [{"name": "add", "arguments": {"a": 1, "b": 2}}]
    assert out[3]["content"] == "Result of the function (call c1): 3"
    assert all(set(m) == {"role", "content"} for m in out)


def test_streaming_holds_back_only_what_may_become_a_call() -> None:
    assert may_become_call("") and may_become_call("  [") and may_become_call("<tool_")
    assert may_become_call('{"name"') and may_become_call("<tool_call>{")
    assert not may_become_call("Hello") and not may_become_call("<b>")
