"""The fields other servers' clients send, on the fake engine: each honoured field changes
the output as documented, each ignored one is accepted, each bounded one is refused past
its bound, naming it."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from model.sampling import SamplingBatch, SamplingRow, sample
from service.api.schemas.openai import ChatMessage
from tests.api.api_testlib import assert_error, serve, sse_events
from tests.api.fake_engine import VOCAB

MODEL = "smollm2-135m-instruct"


def completion(client, **fields):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 2, **fields}
    return client.post("/v1/completions", json=body)


def chat(client, messages=None, **fields):
    body = {
        "model": MODEL,
        "messages": messages or [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        **fields,
    }
    return client.post("/v1/chat/completions", json=body)


# -- accepted and ignored; unknown fields ---------------------------------------------------


def test_fields_clients_always_send_are_accepted(client, engine):
    fields = {
        "store": False,
        "metadata": {"k": "v"},
        "user": "u",
        "service_tier": "auto",
        "reasoning_effort": "low",
        "seed": 3,
        "spaces_between_special_tokens": False,
        "length_penalty": 1.0,
        "use_beam_search": False,
    }
    plain = completion(client).json()["choices"][0]["text"]
    for route in (completion, chat):
        response = route(client, **fields)
        assert response.status_code == 200, response.text
        assert "x-ignored-fields" not in response.headers
    assert completion(client, **fields).json()["choices"][0]["text"] == plain


def test_unknown_fields_are_ignored_and_named_in_a_header(client):
    response = completion(client, parallel_tool_calls=True, priority=0, cache_salt="x")
    assert response.status_code == 200, response.text
    assert response.headers["x-ignored-fields"] == "cache_salt, parallel_tool_calls, priority"
    streamed = chat(client, stream=True, some_new_field=1)
    assert streamed.headers["x-ignored-fields"] == "some_new_field"


@pytest.mark.parametrize("name", ["tools", "functions", "function_call", "chat_template"])
def test_unknown_fields_that_change_the_answer_are_refused(client, name):
    error = assert_error(chat(client, **{name: {}}), 400)
    assert error["param"] == name and name in error["message"]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {"1": 101.0}}, "logit_bias"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": {str(VOCAB): 1.0}}, "logit_bias"),
        ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 10_000}, "truncate_prompt_tokens"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 9}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    ],
)
def test_bounds_are_400_naming_the_field(client, fields, param):
    error = assert_error(completion(client, **fields), 400)
    assert error["param"].split(".")[0] == param, error


# -- honoured ----------------------------------------------------------------------------


def test_logit_bias_and_bans_change_the_draw():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    rows = [
        SamplingRow(logit_bias=[(2, 5.0)]),
        SamplingRow(logit_bias=[(0, -math.inf)]),
    ]
    out = sample(logits, SamplingBatch.build(rows, 3, "cpu"))
    assert out.token_ids.tolist() == [2, 1]
    # logprobs stay the model's own
    assert out.logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())


def test_engine_params_carry_the_dialect_fields(client, engine):
    fields = {
        "logit_bias": {"5": -100.0},
        "min_tokens": 1,
        "skip_special_tokens": False,
        "prompt_logprobs": 2,
    }
    assert completion(client, **fields).status_code == 200
    params = engine.requests[-1].params
    assert params.logit_bias == {5: -100.0} and params.min_tokens == 1
    assert params.skip_special_tokens is False and params.prompt_logprobs == 2


def test_legacy_logprobs_hold_the_sampled_token(client):
    two = completion(client, logprobs=2).json()["choices"][0]["logprobs"]
    for token, top in zip(two["tokens"], two["top_logprobs"], strict=True):
        assert token in top and len(top) in (2, 3)  # the top 2 and the token, when not in them
    zero = completion(client, logprobs=0).json()["choices"][0]["logprobs"]
    assert [list(top) for top in zero["top_logprobs"]] == [[t] for t in zero["tokens"]]


def test_continuous_usage_stats_put_usage_on_every_chunk(client):
    options = {"include_usage": True, "continuous_usage_stats": True}
    for route in (completion, chat):
        events = sse_events(route(client, max_tokens=3, stream=True, stream_options=options).text)
        chunks = [e for e in events if e != "[DONE]"]
        assert all(c["usage"] is not None for c in chunks)
        counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
        assert counts == sorted(counts) and counts[-1] == 3
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    plain = sse_events(completion(client, stream=True, stream_options={"include_usage": True}).text)
    assert all(e["usage"] is None for e in plain[:-2])


def test_return_token_ids(client):
    choice = completion(client, return_token_ids=True).json()["choices"][0]
    assert choice["prompt_token_ids"] == [97, 98, 99] and choice["token_ids"] == [97, 98]
    body = chat(client, return_token_ids=True).json()
    assert bytes(body["prompt_token_ids"]).decode() == "<user>hi\n<assistant>"
    assert body["choices"][0]["token_ids"] == body["prompt_token_ids"][:2]
    events = sse_events(completion(client, return_token_ids=True, stream=True).text)
    assert events[0]["choices"][0]["prompt_token_ids"] == [97, 98, 99]
    assert [t for e in events[:-1] for t in e["choices"][0]["token_ids"]] == [97, 98]


def test_include_stop_str_in_output(client):
    assert completion(client, prompt="abcd", stop="c").json()["choices"][0]["text"] == "ab"
    kept = completion(
        client, prompt="abcd", max_tokens=4, stop="c", include_stop_str_in_output=True
    )
    assert kept.json()["choices"][0]["text"] == "abc"
    body = chat(client, max_tokens=9, stop=["h"], include_stop_str_in_output=True).json()
    assert body["choices"][0]["message"]["content"] == "<user>h"
    events = sse_events(
        chat(client, max_tokens=9, stop="h", include_stop_str_in_output=True, stream=True).text
    )
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "<user>h"


def test_mixed_prompt_lists(client):
    body = completion(client, prompt=["ab", [120, 121]]).json()
    assert [c["text"] for c in body["choices"]] == ["ab", "xy"]


def test_truncate_prompt_tokens_keeps_the_end(client, engine):
    assert completion(client, prompt="abcdef", truncate_prompt_tokens=2).status_code == 200
    assert engine.requests[-1].prompt_token_ids == [101, 102]
    # a prompt longer than the context (512) fits once truncated
    assert completion(client, prompt="x" * 600).status_code == 400
    assert completion(client, prompt="x" * 600, truncate_prompt_tokens=100).status_code == 200


def test_best_of_keeps_the_likeliest(client, engine):
    before = len(engine.requests)
    body = completion(client, n=1, best_of=3).json()
    assert len(engine.requests) - before == 3 and len(body["choices"]) == 1
    assert body["choices"][0]["logprobs"] is None


def test_echo_with_logprobs_and_max_tokens_zero(client):
    body = completion(client, echo=True, logprobs=1, max_tokens=0).json()
    choice = body["choices"][0]
    assert choice["text"] == "abc" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"] and lp["text_offset"] == [0, 1, 2]
    assert lp["token_logprobs"] == [None, -0.1, -0.2] and lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {"\x00": -0.01, "b": -0.1}
    assert body["usage"]["completion_tokens"] == 0
    echoed = completion(client, echo=True, max_tokens=2).json()["choices"][0]
    assert echoed["text"] == "abcab" and echoed["logprobs"] is None
    events = sse_events(completion(client, echo=True, logprobs=0, stream=True).text)
    first = events[0]["choices"][0]
    assert first["text"] == "abca" and first["logprobs"]["tokens"] == ["a", "b", "c", "a"]
    assert events[1]["choices"][0]["logprobs"]["text_offset"] == [4]


def test_vllm_prompt_logprobs_on_both_routes(client):
    choice = completion(client, prompt_logprobs=1).json()["choices"][0]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == 3
    assert entries[1] == {
        "0": {"logprob": -0.01, "rank": 1, "decoded_token": "\x00"},
        "98": {"logprob": -0.1, "rank": 2, "decoded_token": "b"},
    }
    body = chat(client, prompt_logprobs=0).json()
    assert body["prompt_logprobs"][0] is None
    assert len(body["prompt_logprobs"]) == len("<user>hi\n<assistant>")


def test_chat_template_controls(client):
    def prompt(**fields):
        body = chat(client, return_token_ids=True, **fields).json()
        return bytes(body["prompt_token_ids"]).decode()

    assert prompt(add_generation_prompt=False) == "<user>hi\n"
    final = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]
    assert prompt(messages=final, add_generation_prompt=False, continue_final_message=True) == (
        "<user>hi\n<assistant>Sure"
    )
    assert prompt(chat_template_kwargs={"enable_thinking": False}).startswith(
        "[enable_thinking=False]"
    )
    custom = [{"role": "tool_result", "content": "42", "tool_call_id": "c1"}]
    assert prompt(messages=custom) == "<tool_result>42\n<assistant>"
    error = assert_error(chat(client, continue_final_message=True), 400)
    assert error["param"] == "continue_final_message"


def test_chat_echo_prefixes_the_final_assistant_message(client):
    final = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]
    body = chat(
        client, messages=final, echo=True, add_generation_prompt=False, continue_final_message=True
    ).json()
    assert body["choices"][0]["message"]["content"].startswith("Sure")
    assert not chat(client, echo=True).json()["choices"][0]["message"]["content"].startswith("hi")


def test_extra_message_keys_reach_the_template():
    message = ChatMessage.model_validate(
        {"role": "tool", "content": "x", "tool_call_id": "c1", "name": "f"}
    )
    assert message.to_template() == {
        "role": "tool",
        "content": "x",
        "tool_call_id": "c1",
        "name": "f",
    }


def test_embeddings_normalize_false(client, engine):
    body = {"model": MODEL, "input": "abc", "normalize": False}
    assert client.post("/v1/embeddings", json=body).status_code == 200
    assert engine.embed_calls[-1][2] is False


def test_tokenize_in_vllm_shape_beside_today(client):
    ours = client.post("/tokenize", json={"text": "ab"}).json()
    assert ours["tokens"] == [97, 98] and ours["count"] == 2
    vllm = client.post("/tokenize", json={"model": MODEL, "prompt": "ab"}).json()
    assert vllm == {"tokens": [97, 98], "count": 2, "max_model_len": 512}
    messages = [{"role": "user", "content": "hi"}]
    chat_ids = client.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert bytes(chat_ids["tokens"]).decode() == "<user>hi\n<assistant>"
    strs = client.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()
    assert strs["token_strs"] == ["a", "b"]
    assert_error(client.post("/tokenize", json={"text": "a", "prompt": "b"}), 400)
    assert_error(client.post("/tokenize", json={}), 400)
    detok = client.post("/detokenize", json={"model": MODEL, "tokens": [97, 98]}).json()
    assert detok["prompt"] == "ab" and detok["text"] == "ab"


def test_served_model_name_aliases(engine):
    with serve(engine, served_model_name="org/name, short") as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["org/name", "short"]
        for name in ids:
            body = {"model": name, "prompt": "a", "max_tokens": 1}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200 and response.json()["model"] == "org/name"
        assert_error(client.post("/v1/completions", json={**body, "model": MODEL}), 404)


# -- the Responses API through the official SDK -------------------------------------------


@pytest.fixture
def oai(client):
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )


def test_responses_create(oai, engine):
    response = oai.responses.create(
        model=MODEL, input="abc", instructions="sys", max_output_tokens=4, temperature=0
    )
    assert response.status == "incomplete" and response.incomplete_details.reason == (
        "max_output_tokens"
    )
    prompt = bytes(engine.requests[-1].prompt_token_ids).decode()
    assert prompt == "<system>sys\n<user>abc\n<assistant>"
    assert response.output_text == prompt[:4]
    assert response.usage.output_tokens == 4 and response.usage.input_tokens == len(prompt)


def test_responses_stream_helper(oai):
    messages = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    with oai.responses.stream(model=MODEL, input=messages, max_output_tokens=3) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"
    assert kinds.count("response.output_text.delta") == 3
    assert events[-1].response.output_text == "<us"  # as OpenAI: cut short is "incomplete"


def test_responses_refuse_what_they_cannot_do(client):
    body = {"model": MODEL, "input": "a"}
    for extra, param in [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ]:
        error = assert_error(client.post("/v1/responses", json={**body, **extra}), 400)
        assert error["param"] == param
