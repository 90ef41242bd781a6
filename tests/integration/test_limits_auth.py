"""A server with an API key and a tiny queue: auth on the wire, and overload answered with 429."""

from __future__ import annotations

import concurrent.futures
import socket
import time

import httpx
import pytest

from tests.integration.live_server import KEYS, LiveServer

pytestmark = pytest.mark.slow

KEY = KEYS[0]


@pytest.fixture(scope="module")
def small(keyed_server: LiveServer) -> LiveServer:
    """Keys ``KEYS``, one running request and a queue of one (shared with the browser tests)."""
    return keyed_server


def raw_request(server: LiveServer, head: str) -> bytes:
    """Send a hand-written request head; return the response's first line."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1"))
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_key_required_on_the_wire(small):
    url = small.base_url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/ready").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    response = httpx.get(f"{url}/v1/models")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert (
        httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    )
    for key in KEYS:
        assert (
            httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
            == 200
        )


@pytest.mark.parametrize(
    "head",
    [
        "GET /v1/models HTTP/1.1\r\nHost: evil/health?\r\n\r\n",
        "GET /v1/models HTTP/1.1\r\nHost: x/metrics#\r\n\r\n",
        "GET http://127.0.0.1/v1/models HTTP/1.1\r\nHost: 127.0.0.1/health\r\n\r\n",
        "GET /health/../v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "POST /generate HTTP/1.1\r\nHost: a/ready?\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_forged_targets_and_hosts_do_not_bypass(small, head):
    assert raw_request(small, head).startswith(b"HTTP/1.1 401")


def test_overload_gets_429_quickly_and_nothing_breaks(small):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Count to one hundred:", "max_tokens": 40, "ignore_eos": True}

    def one(_):
        started = time.monotonic()
        response = httpx.post(f"{small.base_url}/generate", json=body, headers=headers, timeout=120)
        return response.status_code, response.headers.get("retry-after"), time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))  # a transport error (reset) would raise here
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for status, retry_after, seconds in results:
        if status == 429:
            assert retry_after is not None and int(retry_after) >= 1
            assert seconds < 2.0
    assert httpx.get(f"{small.base_url}/health").status_code == 200
