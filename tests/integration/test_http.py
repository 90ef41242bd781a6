"""The real server with the default model, through httpx and the official openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.live_server import MODEL

pytestmark = pytest.mark.slow

UNICODE_PROMPTS = [
    "请用中文介绍一下你自己。",
    "Write three emoji about the sea: 🌊🐟",
    "日本語とemoji 😀 を混ぜて",
]


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def sse(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return events


def test_models(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_completion_stream_matches_non_stream(oai):
    kwargs = {
        "model": MODEL,
        "prompt": "The capital of France is",
        "max_tokens": 12,
        "temperature": 0,
    }
    whole = oai.completions.create(**kwargs)
    chunks = list(
        oai.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 0


def test_chat_stream_matches_non_stream(oai):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
    ]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0}
    whole = oai.chat.completions.create(**kwargs)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    chunks = list(
        oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_logprobs(oai):
    out = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert (
            entry.logprob <= 0 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        )


@pytest.mark.parametrize("prompt", UNICODE_PROMPTS)
def test_native_stream_unicode_without_replacement_chars(server, prompt):
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
    whole = httpx.post(f"{server}/generate", json=body, timeout=120).json()
    with httpx.stream(
        "POST", f"{server}/generate", json={**body, "stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    assert events[-1] == "[DONE]"
    payloads = events[:-1]
    deltas = [e["text"] for e in payloads]
    # A character split across tokens is held back until complete. Only when max_tokens
    # cuts one in half does the final flush carry U+FFFD (as the non-streamed text does).
    assert all("\ufffd" not in d for d in deltas[:-1])
    if payloads[-1]["finish_reason"] != "length":
        assert "\ufffd" not in deltas[-1]
    assert "".join(deltas) == whole["text"]
    assert payloads[-1]["finish_reason"] == whole["finish_reason"]
    assert payloads[-1]["usage"] == whole["usage"]
    assert all("finish_reason" not in e for e in payloads[:-1])


def test_embeddings_float_and_base64(oai):
    as_float = oai.embeddings.create(
        model=MODEL, input=["hello world", "你好"], encoding_format="float"
    )
    as_base64 = oai.embeddings.create(
        model=MODEL, input=["hello world", "你好"]
    )  # base64 on the wire
    assert len(as_float.data) == 2 and len(as_float.data[0].embedding) == 576
    for a, b in zip(as_float.data, as_base64.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, rel=1e-5, abs=1e-6)
    norm = sum(v * v for v in as_float.data[0].embedding)
    assert norm == pytest.approx(1.0, rel=1e-3)


def test_native_embed_tokenize_detokenize_info(server):
    embed = httpx.post(
        f"{server}/embed", json={"input": ["a", "b"], "pooling": "last"}, timeout=60
    ).json()
    assert embed["dim"] == 576 and len(embed["embeddings"]) == 2
    tokens = httpx.post(f"{server}/tokenize", json={"text": "Hello world 😀"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert (
        httpx.post(f"{server}/detokenize", json={"tokens": tokens["tokens"]}).json()["text"]
        == "Hello world 😀"
    )
    info = httpx.get(f"{server}/info").json()
    assert (
        info["model"] == MODEL and info["config"]["n_layer"] == 30 and info["max_model_len"] == 4096
    )
    # the Q4_1 file's blocks kept (its Q8_0 output layer too), with their float16 scales
    assert info["weights"] == "q4, q8 blocks (float16 scales)"
    assert info["kv_cache_dtype"] == "float32"


def _family_samples(text: str) -> dict[str, list]:
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.samples
    return families


def test_metrics_parse_and_histograms_count_requests(server):
    def duration_count() -> float:
        text = httpx.get(f"{server}/metrics").text
        samples = _family_samples(text)["gptserve_http_request_duration_seconds"]
        return sum(
            s.value
            for s in samples
            if s.name.endswith("_count") and s.labels == {"method": "POST", "path": "/tokenize"}
        )

    before = duration_count()
    for _ in range(3):
        httpx.post(f"{server}/tokenize", json={"text": "x"})
    assert duration_count() == before + 3
    families = _family_samples(httpx.get(f"{server}/metrics").text)
    assert "gptserve_requests_running" in families and "gptserve_kv_cache_usage_ratio" in families
    assert any(
        s.name.endswith("_count") and s.value > 0
        for s in families["gptserve_e2e_request_latency_seconds"]
    )
