"""The OpenAI-compatible routes on the fake engine, driven by the official ``openai`` client."""

from __future__ import annotations

import openai
import pytest

from tests.api.api_testlib import assert_error, sse_events

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def oai(client):
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )


def test_models_list_and_retrieve(oai, client):
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")


def test_unknown_model_is_404_model_not_found(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert info.value.code == "model_not_found"


def test_completion_text_usage_and_finish(oai):
    out = oai.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0)
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == "hel" and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        5,
        3,
        8,
    )


def test_completion_prompt_forms_and_n(oai, engine):
    out = oai.completions.create(model=MODEL, prompt=["ab", "cd"], n=2, max_tokens=2, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == ["ab", "ab", "cd", "cd"]
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 8
    assert [r.params.seed for r in engine.requests[-4:]] == [7, 8, 7, 8]  # distinct per choice
    tokens = oai.completions.create(model=MODEL, prompt=[104, 105], max_tokens=2)
    assert tokens.choices[0].text == "hi"
    batch = oai.completions.create(model=MODEL, prompt=[[104], [105]], max_tokens=1)
    assert [c.text for c in batch.choices] == ["h", "i"]


def test_completion_legacy_logprobs(oai):
    out = oai.completions.create(model=MODEL, prompt="ab", max_tokens=2, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert logprobs.tokens == ["a", "b"]
    assert logprobs.token_logprobs == [-0.5, -0.5]
    assert logprobs.top_logprobs[0] == {"a": -0.5, "b": -1.5}
    assert logprobs.text_offset == [0, 1]


def test_completion_stream_with_usage(oai):
    stream = oai.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "hell"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_n_has_an_index_per_choice(client):
    body = {"model": MODEL, "prompt": "ab", "max_tokens": 2, "n": 3, "stream": True}
    events = sse_events(client.post("/v1/completions", json=body).text)
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "ab", 1: "ab", 2: "ab"}
    assert "usage" not in events[0]


@pytest.mark.parametrize(
    "extra",
    [
        {"best_of": 9},
        {"suffix": "x"},
        {"logit_bias": {"1": 200.0}},
        {"tools": []},
        {"n": 9},
    ],
)
def test_completion_unsupported_fields_are_400(client, extra):
    body = {"model": MODEL, "prompt": "a", "max_tokens": 1, **extra}
    assert_error(client.post("/v1/completions", json=body), 400)


def test_completion_harmless_fields_are_accepted(client):
    body = {
        "model": MODEL,
        "prompt": "a",
        "max_tokens": 1,
        "user": "u1",
        "logit_bias": {},
        "best_of": 1,
    }
    assert client.post("/v1/completions", json=body).status_code == 200


def test_chat_completion(oai, engine):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    out = oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "<sy"  # the fake echoes the templated prompt
    assert out.usage.prompt_tokens == len("<system>s\n<user>hi\n<assistant>")
    assert engine.requests[-1].params.max_tokens == 3


def test_chat_default_max_tokens_fills_the_context(client, engine):
    client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
    )
    prompt = len("<user>x\n<assistant>")
    assert engine.requests[-1].params.max_tokens == min(4096, 512 - prompt)


def test_chat_stream_role_first_then_content_then_finish(oai):
    messages = [{"role": "user", "content": "hé"}]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_logprobs(oai):
    out = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "a"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=2,
    )
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == ["<", "u"]
    assert content[0].bytes == [60]
    assert [t.logprob for t in content[0].top_logprobs] == [-0.5, -1.5]


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        [{"role": "user", "content": "__template_error__"}],
    ],
)
def test_chat_bad_messages_are_400(client, messages):
    assert_error(
        client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}), 400
    )


def test_chat_top_logprobs_needs_logprobs(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}
    assert_error(client.post("/v1/chat/completions", json=body), 400)


def test_embeddings_float_and_base64_agree(oai):
    as_float = oai.embeddings.create(model=MODEL, input=["ab", "c"], encoding_format="float")
    as_base64 = oai.embeddings.create(model=MODEL, input=["ab", "c"])  # the client asks for base64
    assert len(as_float.data) == 2 and as_float.usage.prompt_tokens == 3
    for a, b in zip(as_float.data, as_base64.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, rel=1e-6)


def test_embeddings_limits(make_client):
    with make_client(max_embed_batch=2) as client:
        assert_error(
            client.post("/v1/embeddings", json={"model": MODEL, "input": ["a", "b", "c"]}), 400
        )
        assert_error(client.post("/v1/embeddings", json={"model": MODEL, "input": []}), 400)
        assert_error(
            client.post("/v1/embeddings", json={"model": MODEL, "input": "a", "dimensions": 3}), 400
        )
