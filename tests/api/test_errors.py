"""Bad input of every kind is a 4xx in the one error shape, and the server stays healthy."""

from __future__ import annotations

import json

import pytest

from tests.api.api_testlib import assert_error

MODEL = "smollm2-135m-instruct"
GEN = "/generate"
CMPL = "/v1/completions"

CASES = [
    ("empty prompt", GEN, {"prompt": ""}, 400),
    ("missing prompt", GEN, {"max_tokens": 3}, 400),
    ("prompt past the context", GEN, {"prompt": "x" * 600}, 400),
    ("negative max_tokens", GEN, {"prompt": "a", "max_tokens": -1}, 400),
    ("zero max_tokens", GEN, {"prompt": "a", "max_tokens": 0}, 400),
    ("huge max_tokens", GEN, {"prompt": "a", "max_tokens": 10**12}, 400),
    ("max_tokens over the limit", GEN, {"prompt": "a", "max_tokens": 5000}, 400),
    ("negative temperature", GEN, {"prompt": "a", "temperature": -0.1}, 400),
    ("top_p above 1", GEN, {"prompt": "a", "top_p": 1.5}, 400),
    ("top_p zero", GEN, {"prompt": "a", "top_p": 0}, 400),
    ("string for int", GEN, {"prompt": "a", "max_tokens": "5"}, 400),
    ("int for string", GEN, {"prompt": 5}, 400),
    ("bool for float", GEN, {"prompt": "a", "temperature": True}, 400),
    ("list for string", GEN, {"prompt": ["a"]}, 400),
    ("unknown field", GEN, {"prompt": "a", "temprature": 0.5}, 400),
    ("too many stop strings", GEN, {"prompt": "a", "stop": ["x"] * 9}, 400),
    ("too many stop strings (hard cap)", GEN, {"prompt": "a", "stop": ["x"] * 65}, 400),
    ("stop string too long", GEN, {"prompt": "a", "stop": ["x" * 300]}, 400),
    ("empty stop string", GEN, {"prompt": "a", "stop": [""]}, 400),
    ("huge logprobs", GEN, {"prompt": "a", "logprobs": 10**6}, 400),
    ("negative seed", GEN, {"prompt": "a", "seed": -1}, 400),
    ("seed past 63 bits", GEN, {"prompt": "a", "seed": 2**64}, 400),
    ("oov stop token id", GEN, {"prompt": "a", "stop_token_ids": [300]}, 400),
    ("body is a list", GEN, [1, 2], 400),
    ("huge n", CMPL, {"model": MODEL, "prompt": "a", "n": 10**6}, 400),
    ("n over the limit", CMPL, {"model": MODEL, "prompt": "a", "n": 9}, 400),
    ("huge logprobs (openai)", CMPL, {"model": MODEL, "prompt": "a", "logprobs": 21}, 400),
    ("oov token ids", CMPL, {"model": MODEL, "prompt": [1, 999999]}, 400),
    ("negative token id", CMPL, {"model": MODEL, "prompt": [-1]}, 400),
    ("empty token prompt", CMPL, {"model": MODEL, "prompt": []}, 400),
    ("empty string prompt", CMPL, {"model": MODEL, "prompt": ""}, 400),
    ("too many prompts", CMPL, {"model": MODEL, "prompt": ["a"] * 17}, 400),
    (
        "stream_options without stream",
        CMPL,
        {"model": MODEL, "prompt": "a", "stream_options": {}},
        400,
    ),
    ("empty embedding batch", "/embed", {"input": []}, 400),
    ("oversized embedding batch", "/embed", {"input": ["a"] * 65}, 400),
    ("empty embedding input", "/embed", {"input": ""}, 400),
    ("bad pooling", "/embed", {"input": "a", "pooling": "max"}, 400),
    ("oov detokenize", "/detokenize", {"tokens": [2**40]}, 400),
]


@pytest.mark.parametrize(("name", "path", "body", "status"), CASES, ids=[c[0] for c in CASES])
def test_bad_json_input(client, engine, name, path, body, status):
    seen = len(engine.requests)  # the warm-up request
    for stream in (False, True):
        if isinstance(body, dict) and path in (GEN, CMPL) and "stream_options" not in body:
            body = {**body, "stream": stream}
        assert_error(client.post(path, json=body), status)
    assert len(engine.requests) == seen  # the engine never saw it
    assert client.get("/health").status_code == 200


RAW_CASES = [
    ("NaN temperature", b'{"prompt": "a", "temperature": NaN}'),
    ("Infinity top_p", b'{"prompt": "a", "top_p": Infinity}'),
    ("malformed JSON", b'{"prompt": "a",'),
    ("not JSON", b"hello"),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}'),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
]


@pytest.mark.parametrize(("name", "raw"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_bad_raw_bodies(client, engine, name, raw):
    seen = len(engine.requests)
    response = client.post(GEN, content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 400)
    assert "Traceback" not in error["message"]
    assert len(engine.requests) == seen
    assert client.get("/health").status_code == 200


def test_validation_message_names_the_field(client):
    error = assert_error(client.post(GEN, json={"prompt": "a", "top_p": 2}), 400)
    assert error["param"] == "top_p" and "top_p" in error["message"]
    error = assert_error(client.post(GEN, json={"prompt": "a", "tempreture": 1}), 400)
    assert "tempreture" in error["message"]
    error = assert_error(
        client.post(GEN, content=b"{", headers={"content-type": "application/json"}), 400
    )
    assert "JSON" in error["message"]


def test_unknown_route_and_method_use_the_error_shape(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.get(GEN), 405)


def test_no_422_anywhere(client):
    response = client.post(GEN, json={})
    assert response.status_code == 400
    assert "422" not in json.dumps(
        client.get("/openapi.json").json()["paths"][GEN]["post"]["responses"]
    )
