"""A client that leaves frees its request: running requests and KV usage return to idle within 2 s."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

LONG = {
    "prompt": "Tell me a very long story about the sea.",
    "max_tokens": 1000,
    "ignore_eos": True,
}


def gauges(server: str) -> tuple[float, float]:
    """(requests running, KV cache usage ratio) from /metrics."""
    values = {"gptserve_requests_running": 0.0, "gptserve_kv_cache_usage_ratio": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{server}/metrics").text):
        for sample in family.samples:
            if sample.name in values:
                values[sample.name] += sample.value
    return values["gptserve_requests_running"], values["gptserve_kv_cache_usage_ratio"]


def wait_for(server: str, predicate, timeout: float) -> float:
    """Seconds until ``predicate(running, kv)`` holds; fails after ``timeout``."""
    started = time.monotonic()
    while True:
        running, kv = gauges(server)
        if predicate(running, kv):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"gauges stuck at running={running} kv={kv}")
        time.sleep(0.05)


def test_stream_disconnect_frees_the_request(server):
    wait_for(server, lambda r, kv: r == 0 and kv == 0, 10)
    with httpx.stream(
        "POST", f"{server}/generate", json={**LONG, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        events = []
        # Keep the line iterator referenced: breaking out of a loop over it would drop
        # it, and closing it closes the stream, so the server would abort at once.
        lines = response.iter_lines()
        while len(events) < 3:
            line = next(lines)
            if line.startswith("data: "):
                events.append(line)
        assert "finish_reason" not in "".join(events), events
        wait_for(server, lambda r, kv: r >= 1 and kv > 0, 2.0)  # it is running while we listen
        del lines
    wait_for(server, lambda r, kv: r == 0 and kv == 0, 2.0)


def test_non_streaming_client_timeout_frees_the_request(server):
    wait_for(server, lambda r, kv: r == 0 and kv == 0, 10)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/generate", json=LONG, timeout=httpx.Timeout(10, read=1.5))
    wait_for(server, lambda r, kv: r == 0 and kv == 0, 2.0)
