"""Body and header limits, request ids, the access log, CORS and the HTTP metrics."""

from __future__ import annotations

import logging

from prometheus_client.parser import text_string_to_metric_families

from tests.api.api_testlib import assert_error, serve
from tests.api.fake_engine import FakeEngine


def _chunks(total: int, size: int = 4096):
    sent = 0
    yield b'{"prompt": "'
    while sent < total:
        yield b"a" * size
        sent += size
    yield b'"}'


def test_body_limit_with_content_length(make_client):
    with make_client(max_body_bytes=2048) as client:
        response = client.post("/generate", json={"prompt": "a" * 4000})
        assert assert_error(response, 413)["code"] == "request_too_large"
        assert (
            client.post("/generate", json={"prompt": "a" * 400, "max_tokens": 1}).status_code == 200
        )


def test_body_limit_without_content_length(make_client):
    with make_client(max_body_bytes=2048) as client:
        response = client.post(
            "/generate", content=_chunks(8192), headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers  # really chunked
        assert_error(response, 413)
        small = client.post(
            "/generate", content=_chunks(400, 200), headers={"content-type": "application/json"}
        )
        assert small.status_code == 200, small.text
        assert client.get("/health").status_code == 200


def test_too_many_headers_is_431(make_client):
    with make_client(max_header_count=20) as client:
        headers = {f"x-h{i}": "v" for i in range(30)}
        assert_error(client.get("/health", headers=headers), 431)
        assert client.get("/health", headers={"x-one": "v"}).status_code == 200


def test_request_id_echoed_or_generated(client):
    assert (
        client.get("/health", headers={"X-Request-ID": "abc-123.x:y"}).headers["x-request-id"]
        == "abc-123.x:y"
    )
    for bad in ("has space", "x" * 200, "semi;colon", ""):
        echoed = client.get("/health", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert echoed != bad and len(echoed) == 32
    generated = client.get("/health").headers["x-request-id"]
    assert len(generated) == 32
    assert client.post("/generate", json={"prompt": ""}).headers[
        "x-request-id"
    ]  # errors carry it too


def test_access_log_line_has_id_status_and_tokens(client, caplog):
    with caplog.at_level(logging.INFO, logger="service.api.access"):
        client.post(
            "/generate",
            json={"prompt": "hello", "max_tokens": 2},
            headers={"X-Request-ID": "rid-7"},
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "service.api.access"]
    line = next(line for line in lines if "rid=rid-7" in line)
    assert '"POST /generate" 200' in line
    assert "prompt_tokens=5 completion_tokens=2" in line


def test_stream_access_log_has_tokens(client, caplog):
    with caplog.at_level(logging.INFO, logger="service.api.access"):
        client.post(
            "/v1/completions",
            json={
                "model": "smollm2-135m-instruct",
                "prompt": "abc",
                "max_tokens": 3,
                "stream": True,
            },
            headers={"X-Request-ID": "rid-s"},
        )
    line = next(r.getMessage() for r in caplog.records if "rid=rid-s" in r.getMessage())
    assert "prompt_tokens=3 completion_tokens=3" in line


def test_prompts_are_logged_only_when_asked(caplog):
    canary = "canary-7f3a9"
    with caplog.at_level(logging.DEBUG), serve(FakeEngine()) as client:
        client.post("/generate", json={"prompt": canary, "max_tokens": 1})
    assert canary not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO), serve(FakeEngine(), log_prompts=True) as client:
        client.post("/generate", json={"prompt": canary, "max_tokens": 1})
    assert canary in caplog.text


def test_cors_off_by_default(client):
    response = client.get("/health", headers={"Origin": "http://app.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options(
        "/generate",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_configured_origins_only(make_client):
    with make_client(cors_origins="http://app.example", api_key="k1") as client:
        client.headers.pop("Authorization")
        preflight = client.options(
            "/generate",
            headers={
                "Origin": "http://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200  # no key needed for a preflight
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-credentials" not in preflight.headers
        other = client.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        denied = client.get("/info", headers={"Origin": "http://app.example"})
        assert denied.status_code == 401
        assert denied.headers["access-control-allow-origin"] == "http://app.example"


def _samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_count_requests_by_route_template(client):
    for _ in range(3):
        client.post("/generate", json={"prompt": "ab", "max_tokens": 1})
    client.post("/generate", json={"prompt": ""})
    client.get("/v1/models/smollm2-135m-instruct")
    client.get("/no/such/path/123")
    text = client.get("/metrics").text
    counts = _samples(text, "gptserve_http_requests_total")
    assert counts[(("method", "POST"), ("path", "/generate"), ("status", "200"))] == 3
    assert counts[(("method", "POST"), ("path", "/generate"), ("status", "400"))] == 1
    assert (
        counts[(("method", "GET"), ("path", "/v1/models/{model_id:path}"), ("status", "200"))] == 1
    )
    assert counts[(("method", "GET"), ("path", "unmatched"), ("status", "404"))] == 1
    histogram = _samples(text, "gptserve_http_request_duration_seconds_count")
    assert histogram[(("method", "POST"), ("path", "/generate"))] == 4
    assert "gptserve_requests_running" in text  # the engine's registry is exposed too


def test_oversized_headers_are_431(make_client):
    with make_client(max_header_bytes=2048) as client:
        error = assert_error(client.get("/health", headers={"x-big": "a" * 4000}), 431)
        assert "2048" in error["message"]
        assert client.get("/health", headers={"x-small": "a" * 500}).status_code == 200
