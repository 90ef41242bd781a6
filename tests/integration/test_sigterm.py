"""SIGTERM: readiness 503 at once, new work refused, streams in flight finish, exit code 0."""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def _data(lines) -> list:
    return [
        line[6:] if line == "data: [DONE]" else json.loads(line[6:])
        for line in lines
        if line.startswith("data: ")
    ]


def _wait_status(url: str, status: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if httpx.get(url, timeout=2).status_code == status:
            return time.monotonic() - started
        time.sleep(0.05)
    pytest.fail(f"{url} never answered {status}")


def test_stream_in_flight_completes_and_exit_is_0(server_factory):
    server = server_factory("--drain-timeout", "60")
    body = {"prompt": "List the planets:", "max_tokens": 48, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/generate", json=body, timeout=120) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        server.terminate()
        assert _wait_status(f"{server.base_url}/ready", 503, 5.0) < 1.0
        refused = httpx.post(f"{server.base_url}/generate", json={"prompt": "hi"}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        events = _data([first, *lines])
    assert events[-1] == "[DONE]"
    assert events[-2]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 48
    assert server.process.wait(30) == 0


def test_drain_timeout_ends_the_rest_with_abort(server_factory):
    server = server_factory("--drain-timeout", "1")
    body = {"prompt": "Write a long essay:", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/generate", json=body, timeout=120) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        started = time.monotonic()
        server.terminate()
        events = _data([first, *lines])
    assert events[-1] == "[DONE]"
    assert events[-2]["finish_reason"] == "abort"
    assert server.process.wait(30) == 0
    assert time.monotonic() - started < 15
