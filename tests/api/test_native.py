"""The native routes on the fake engine: /generate (JSON and SSE), /embed, /tokenize, /detokenize, ops."""

from __future__ import annotations

import math
import threading

from service.engine.types import SamplingParams
from tests.api.api_testlib import assert_error, serve, sse_events
from tests.api.fake_engine import EMBED_DIM, FakeEngine


def test_generate_returns_text_finish_reason_and_usage(client, engine):
    response = client.post("/generate", json={"prompt": "hello", "max_tokens": 3, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == "hel"
    assert body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert body["id"].startswith("gen-")
    assert "token_ids" not in body and "logprobs" not in body
    assert response.headers["content-type"] == "application/json"


def test_generate_converts_every_field_to_sampling_params(client, engine):
    body = {
        "prompt": "abc",
        "max_tokens": 2,
        "temperature": 0.5,
        "top_k": 7,
        "top_p": 0.9,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.3,
        "frequency_penalty": -0.4,
        "stop": ["zz"],
        "stop_token_ids": [5],
        "seed": 42,
        "logprobs": 3,
        "ignore_eos": True,
    }
    assert client.post("/generate", json=body).status_code == 200
    request = engine.requests[-1]
    assert request.prompt_token_ids == [97, 98, 99]
    assert request.params == SamplingParams(
        max_tokens=2,
        temperature=0.5,
        top_k=7,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        presence_penalty=0.3,
        frequency_penalty=-0.4,
        stop=["zz"],
        stop_token_ids=[5],
        seed=42,
        logprobs=3,
        ignore_eos=True,
    )


def test_generate_default_max_tokens_is_the_setting(make_client, engine):
    with make_client(default_max_tokens=4) as client:
        assert (
            client.post("/generate", json={"prompt": "abcdefgh"}).json()["usage"][
                "completion_tokens"
            ]
            == 4
        )


def test_generate_token_ids_and_logprobs_when_asked(client):
    body = {"prompt": "ab", "max_tokens": 3, "return_token_ids": True, "logprobs": 2}
    out = client.post("/generate", json=body).json()
    assert out["token_ids"] == [97, 98, 97]
    assert len(out["logprobs"]) == 3
    first = out["logprobs"][0]
    assert first["token_id"] == 97 and first["token"] == "a" and first["logprob"] == -0.5
    assert [t["token_id"] for t in first["top"]] == [97, 98]


def test_generate_stop_string_ends_with_stop(client):
    out = client.post(
        "/generate", json={"prompt": "abcdef", "max_tokens": 10, "stop": ["c"]}
    ).json()
    assert out["text"] == "ab"
    assert out["finish_reason"] == "stop"


def test_generate_stream_events_concatenate_to_the_text(client):
    body = {"prompt": "héllo wörld", "max_tokens": 11, "temperature": 0}
    whole = client.post("/generate", json=body).json()
    response = client.post("/generate", json={**body, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    payloads = events[:-1]
    assert "".join(e["text"] for e in payloads) == whole["text"]
    assert all("finish_reason" not in e for e in payloads[:-1])
    assert payloads[-1]["finish_reason"] == "length"
    assert payloads[-1]["usage"] == whole["usage"]
    assert "\ufffd" not in whole["text"]


def test_stream_error_after_start_is_in_band_then_done(client, engine):
    engine.fail_after = 2
    response = client.post("/generate", json={"prompt": "abcdef", "max_tokens": 5, "stream": True})
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [e["text"] for e in events[:2]] == ["a", "b"]
    assert events[2]["error"]["code"] == "internal_error"
    assert "sampling failed" not in response.text  # internals stay in the log
    assert events[3] == "[DONE]"


def test_failure_without_stream_is_a_generic_500(client, engine):
    engine.fail_after = 1
    error = assert_error(client.post("/generate", json={"prompt": "abc", "max_tokens": 5}), 500)
    assert error["message"] == "internal server error"


def test_queue_full_is_429_with_retry_after(client, engine):
    engine.queue_full = True
    for stream in (False, True):
        response = client.post("/generate", json={"prompt": "abc", "stream": stream})
        assert assert_error(response, 429)["code"] == "queue_full"
        assert response.headers["retry-after"] == "3"


def test_prompt_past_the_context_is_400_naming_both_sizes():
    with serve(FakeEngine(max_model_len=32)) as client:
        for stream in (False, True):
            response = client.post("/generate", json={"prompt": "x" * 40, "stream": stream})
            error = assert_error(response, 400)
            assert "40" in error["message"] and "32" in error["message"]
            assert error["code"] == "context_length_exceeded"
        error = assert_error(
            client.post("/generate", json={"prompt": "x" * 10, "max_tokens": 30}), 400
        )
        assert "10" in error["message"] and "30" in error["message"] and "32" in error["message"]


def test_max_prompt_tokens_setting(make_client):
    with make_client(max_prompt_tokens=4) as client:
        assert client.post("/generate", json={"prompt": "abcd", "max_tokens": 1}).status_code == 200
        assert_error(client.post("/generate", json={"prompt": "abcde", "max_tokens": 1}), 400)


def test_embed_single_and_batch(client, engine):
    one = client.post("/embed", json={"input": "hello"}).json()
    assert one["dim"] == EMBED_DIM and len(one["embeddings"]) == 1
    assert math.isclose(sum(v * v for v in one["embeddings"][0]), 1.0, rel_tol=1e-6)
    assert one["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    batch = client.post(
        "/embed", json={"input": ["a", "bb"], "pooling": "last", "normalize": False}
    ).json()
    assert len(batch["embeddings"]) == 2
    inputs, pooling, normalize = engine.embed_calls[-1]
    assert inputs == [[97], [98, 98]] and pooling == "last" and normalize is False


def test_embed_batch_limit(make_client):
    with make_client(max_embed_batch=2) as client:
        assert_error(client.post("/embed", json={"input": ["a", "b", "c"]}), 400)


def test_tokenize_and_detokenize(client):
    out = client.post("/tokenize", json={"text": "hé"}).json()
    assert out == {"tokens": [104, 195, 169], "count": 3, "max_model_len": 512}
    detok = client.post("/detokenize", json={"tokens": out["tokens"]}).json()
    assert detok == {"text": "hé", "prompt": "hé"}
    error = assert_error(client.post("/detokenize", json={"tokens": [1, 300]}), 400)
    assert "300" in error["message"]


def test_info_lists_model_and_limits(client):
    info = client.get("/info").json()
    assert info["model"] == "smollm2-135m-instruct"
    assert info["max_model_len"] == 512
    assert info["limits"]["max_n"] == 8 and info["limits"]["context"] == 512
    assert info["config"]["vocab_size"] == 300
    assert info["device"] == "cpu" and info["dtype"] == "float32"


def test_health_and_ready(client, engine):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    engine.dead = True
    assert_error(client.get("/health"), 503)


def test_not_ready_while_loading_but_alive():
    release = threading.Event()
    engine = FakeEngine()

    def slow_factory(_settings):
        release.wait(10)
        return engine

    from starlette.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(), engine_factory=slow_factory)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/health").status_code == 200
        assert assert_error(client.get("/ready"), 503)["code"] == "not_ready"
        assert_error(client.post("/generate", json={"prompt": "a"}), 503)
        release.set()


def test_drain_flips_readiness_and_refuses_new_work(client, engine):
    client.portal.call(client.app.state.runtime.drain)
    assert assert_error(client.get("/ready"), 503)["code"] == "draining"
    assert_error(client.post("/generate", json={"prompt": "a"}), 503)
    assert client.get("/health").status_code == 200
    assert engine.stopping
