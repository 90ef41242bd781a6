"""Bad input against the real server: each case is a 4xx with a message, and /health stays 200."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.live_server import MODEL

pytestmark = pytest.mark.slow

JSON = {"content-type": "application/json"}

JSON_CASES = [
    ("empty prompt", "/generate", {"prompt": ""}),
    ("prompt past the context", "/generate", {"prompt": "hello " * 5000}),
    (
        "prompt plus max_tokens past the context",
        "/generate",
        {"prompt": "hello " * 2000, "max_tokens": 4000},
    ),
    ("negative max_tokens", "/generate", {"prompt": "a", "max_tokens": -5}),
    ("huge max_tokens", "/generate", {"prompt": "a", "max_tokens": 2**62}),
    ("negative temperature", "/generate", {"prompt": "a", "temperature": -1}),
    ("top_p above 1", "/generate", {"prompt": "a", "top_p": 1.01}),
    ("wrong type", "/generate", {"prompt": "a", "max_tokens": "ten"}),
    ("unknown field", "/generate", {"prompt": "a", "foo": 1}),
    ("too many stop strings", "/generate", {"prompt": "a", "stop": [str(i) for i in range(20)]}),
    ("huge n", "/v1/completions", {"model": MODEL, "prompt": "a", "n": 10**9}),
    ("huge logprobs", "/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 10**9}),
    ("out-of-vocabulary token ids", "/v1/completions", {"model": MODEL, "prompt": [1, 999_999]}),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "a"}),
    ("empty embedding batch", "/v1/embeddings", {"model": MODEL, "input": []}),
    ("oversized embedding batch", "/embed", {"input": ["a"] * 65}),
    ("detokenize out of vocabulary", "/detokenize", {"tokens": [49152]}),
]


@pytest.mark.parametrize(("name", "path", "body"), JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_bad_json(server, name, path, body):
    response = httpx.post(f"{server}{path}", json=body, timeout=30)
    _assert_4xx_error(response)
    assert httpx.get(f"{server}/health").status_code == 200


RAW_CASES = [
    ("NaN", b'{"prompt": "a", "temperature": NaN}'),
    ("Infinity", b'{"prompt": "a", "top_p": -Infinity}'),
    ("malformed JSON", b'{"prompt": '),
    ("invalid UTF-8", b'{"prompt": "\xc3\x28 \xff"}'),
]


@pytest.mark.parametrize(("name", "raw"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_bad_raw_body(server, name, raw):
    _assert_4xx_error(httpx.post(f"{server}/generate", content=raw, headers=JSON))
    assert httpx.get(f"{server}/health").status_code == 200


def test_oversized_body_with_and_without_content_length(server):
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    response = httpx.post(f"{server}/generate", content=big, headers=JSON, timeout=30)
    assert _assert_4xx_error(response) == 413

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    response = httpx.post(f"{server}/generate", content=chunks(), headers=JSON, timeout=30)
    assert "content-length" not in response.request.headers
    assert _assert_4xx_error(response) == 413
    assert httpx.get(f"{server}/health").status_code == 200


def test_oversized_and_too_many_headers(server):
    try:
        response = httpx.get(f"{server}/health", headers={"x-big": "a" * 65536})
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
        # h11 refuses the head after reading part of it; the server then answers 400 and
        # closes with the rest of the head unread, and the kernel may turn that close into
        # a reset that reaches the client before the answer does. Refused either way.
        pass
    else:
        assert 400 <= response.status_code < 500 and response.text  # h11 refuses the head
    response = httpx.get(f"{server}/health", headers={f"x-h{i}": "v" for i in range(150)})
    assert _assert_4xx_error(response) == 431
    assert httpx.get(f"{server}/health").status_code == 200


def _assert_4xx_error(response: httpx.Response) -> int:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return response.status_code
