"""Slow clients against real uvicorn with the server's own protocol settings: a
request must arrive within ``request_timeout``, connections beyond
``max_connections`` are refused, and a response may take longer than the
deadline. The engine is the HTTP layer's fake: these tests need no model."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from service.api.app import create_app
from service.api.server import uvicorn_config
from service.settings import Settings
from tests.api.fake_engine import FakeEngine
from tests.integration.live_server import free_port

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[int, FakeEngine]]:
    """uvicorn in a thread on a free port, configured as ``gptserve serve`` configures it."""
    engine = FakeEngine(token_delay=0.05)
    port = free_port()
    settings = Settings(
        host="127.0.0.1", port=port, request_timeout=TIMEOUT, max_connections=8, log_level="warning"
    )
    app = create_app(settings, engine_factory=lambda _settings: engine)
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield port, engine
    server.should_exit = True
    thread.join(15)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> tuple[bool, bytes]:
    """Sends ``trickle`` a byte every 0.1 s until the server closes the connection;
    whether it did within ``seconds``, and what it answered."""
    sock.settimeout(0.1)
    deadline = time.monotonic() + seconds
    data = b""
    i = 0
    while time.monotonic() < deadline:
        if trickle:
            try:
                sock.send(trickle[i % len(trickle) : i % len(trickle) + 1])
            except OSError:
                return True, data
            i += 1
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return True, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


@pytest.mark.timeout(60)
def test_a_slow_request_head_is_cut_at_the_deadline(guarded):
    port, _ = guarded
    socks = [connect(port) for _ in range(5)]
    for sock in socks:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    results = [closed_within(sock, TIMEOUT + 4, trickle=b"X-Slow: aaaa\r\n") for sock in socks]
    assert all(closed for closed, _ in results), "a slow head was held past the deadline"
    assert time.monotonic() - start < TIMEOUT + 4
    assert all(data.startswith(b"HTTP/1.1 408 ") for _, data in results), results[0][1]
    for sock in socks:
        sock.close()


@pytest.mark.timeout(60)
def test_a_silent_connection_is_cut_at_the_deadline(guarded):
    port, _ = guarded
    with connect(port) as sock:
        closed, data = closed_within(sock, TIMEOUT + 4)
    assert closed and data.startswith(b"HTTP/1.1 408 ")


@pytest.mark.timeout(60)
def test_a_slow_request_body_is_cut_at_the_deadline(guarded):
    port, _ = guarded
    with connect(port) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 200\r\n\r\n{"
        )
        closed, _ = closed_within(sock, TIMEOUT + 4, trickle=b" ")
    assert closed, "a slow body was held past the deadline"


@pytest.mark.timeout(60)
def test_connections_beyond_the_cap_are_refused(guarded):
    port, _ = guarded
    held = [connect(port) for _ in range(8)]
    try:
        time.sleep(0.2)
        with connect(port) as extra:
            closed, data = closed_within(extra, 0.5)
        assert closed and data == b"", "a connection beyond max_connections was accepted"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200


@pytest.mark.timeout(60)
def test_responses_and_keep_alive_requests_are_not_cut(guarded):
    port, _ = guarded
    body: dict[str, Any] = {"prompt": "abcdefghijklmnopqrstuvwxyz0123456789", "max_tokens": 36}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        start = time.monotonic()
        with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
            text = "".join(response.iter_text())
        assert time.monotonic() - start > TIMEOUT  # the stream outlived the request deadline
        assert response.status_code == 200 and text.rstrip().endswith("data: [DONE]")
        time.sleep(TIMEOUT / 2)
        for _ in range(3):  # the same connection, each request within its own deadline
            assert client.post("/generate", json={**body, "max_tokens": 2}).status_code == 200
