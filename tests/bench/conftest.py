"""A tiny OpenAI-style streaming server for the load generator's end-to-end tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class StubState:
    delay_s: float = 0.005  # between tokens
    bodies: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    max_in_flight: int = 0


def make_handler(state: StubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            ok = self.path in ("/health", "/v1/models")
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            if self.path == "/v1/models":
                self.wfile.write(b'{"data": [{"id": "stub", "max_model_len": 512}]}')

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.bodies.append(body)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                if self.path != "/v1/completions" or body.get("max_tokens", 0) > 1000:
                    self._error()
                else:
                    self._stream(body)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def _error(self) -> None:
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "bad request"}}')

        def _send(self, payload: str) -> None:
            self.wfile.write(payload.encode())
            self.wfile.flush()

        def _stream(self, body: dict[str, Any]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self._send(": ping\n\n")
            n = body["max_tokens"]
            for i in range(n):
                time.sleep(state.delay_s)
                chunk = {"choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}
                self._send(f"data: {json.dumps(chunk)}\n\n")
            prompt_tokens = len(body["prompt"]) if isinstance(body["prompt"], list) else 7
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": n + prompt_tokens,
            }
            self._send(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n")
            self._send("data: [DONE]\n\n")

    return Handler


@pytest.fixture
def stub_server() -> Iterator[tuple[str, StubState]]:
    state = StubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
