"""Helpers for the HTTP-layer tests: a served app on a fake engine, SSE parsing, raw ASGI calls."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI
from starlette.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from tests.api.fake_engine import FakeEngine


def wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.01)
    raise TimeoutError("the app did not become ready")


@contextmanager
def serve(engine: FakeEngine, wait: bool = True, **overrides: Any) -> Iterator[TestClient]:
    app = create_app(Settings(**overrides), engine_factory=lambda _settings: engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        if wait:
            headers = (
                {"Authorization": f"Bearer {overrides['api_key'].split(',')[0]}"}
                if "api_key" in overrides
                else {}
            )
            client.headers.update(headers)
            wait_ready(client)
        yield client


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body: JSON objects, and the string "[DONE]"."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


# -- raw ASGI calls, for what a test client cannot express ---------------------------------------


class ASGIResult:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""

    def json(self) -> Any:
        return json.loads(self.body)


async def asgi_call(
    app: FastAPI,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    disconnect_after: float | None = None,
) -> ASGIResult:
    """One request straight into the ASGI app; optionally the client leaves after a delay."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers if headers is not None else [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    result = ASGIResult()
    response_done = asyncio.Event()

    async def receive() -> MutableMapping[str, Any]:
        if messages:
            return messages.pop(0)
        if disconnect_after is not None:
            await asyncio.sleep(disconnect_after)
        else:
            await response_done.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            result.body += message.get("body", b"")
            if not message.get("more_body", False):
                response_done.set()

    await app(scope, receive, send)
    return result
