"""Pure ASGI middleware: request context (id, access log, HTTP metrics) and input limits.

Pure ASGI rather than ``BaseHTTPMiddleware`` so that streaming responses and
client disconnects pass through untouched.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import APIError, as_api_error

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("service.api.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def scope_state(scope: Scope) -> dict[str, Any]:
    """The per-request ``state`` dict (what Starlette exposes as ``request.state``)."""
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


class HTTPMetrics:
    """HTTP-level series; the engine records its own metrics where the facts are."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gptserve_http_requests_total",
            "HTTP requests by method, route template and status",
            ["method", "path", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "gptserve_http_request_duration_seconds",
            "HTTP request duration (to the last byte of the response), by route template",
            ["method", "path"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests.labels(method, path, str(status)).inc()
        self.duration.labels(method, path).observe(seconds)


class RequestContextMiddleware:
    """Outermost layer: X-Request-ID, one access-log line, HTTP metrics, last-resort 500."""

    def __init__(self, app: ASGIApp, metrics: HTTPMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope_state(scope)["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # the last line of defence: log it, answer a generic 500
            error = as_api_error(exc)
            if status == 0:
                await error.response()(scope, receive, send_with_id)
            else:
                logger.error("request %s failed after its response started", request_id)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        self.metrics.observe(method, path, status, seconds)
        state = scope_state(scope)
        access_logger.info(
            '%s "%s %s" %d %.1fms rid=%s prompt_tokens=%s completion_tokens=%s',
            _client(scope),
            method,
            scope.get("path", ""),
            status,
            seconds * 1000.0,
            state.get("request_id"),
            state.get("prompt_tokens", "-"),
            state.get("completion_tokens", "-"),
        )


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


class LimitsMiddleware:
    """Rejects too many or too large headers (431) and bodies over the limit (413), chunked or not.

    uvicorn's h11 limit bounds the memory an incomplete request head can take;
    a complete head that arrives in one read is measured here. The body is
    read here, up to the limit, and replayed to the app: a chunked upload
    without Content-Length is counted as it arrives and never buffered past
    ``max_body_bytes``.
    """

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, max_header_count: int, max_header_bytes: int
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_count = max_header_count
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        problem = self._header_problem(headers)
        if problem is not None:
            await APIError(431, problem, code="headers_too_large").response()(scope, receive, send)
            return
        if self._declared_length(headers) > self.max_body_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        messages = await self._read_body(receive)
        if messages is None:
            return  # the client went away before sending its body
        if isinstance(messages, APIError):
            await messages.response()(scope, receive, send)
            return
        await self.app(scope, _replay(messages, receive), send)

    def _header_problem(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        if len(headers) > self.max_header_count:
            return (
                f"too many request headers ({len(headers)}; the limit is {self.max_header_count})"
            )
        size = sum(len(name) + len(value) + 4 for name, value in headers)  # "name: value\r\n"
        if size > self.max_header_bytes:
            return f"request headers too large ({size} bytes; the limit is {self.max_header_bytes})"
        return None

    async def _read_body(self, receive: Receive) -> list[Message] | APIError | None:
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return self._too_large()
            messages.append(message)
            if not message.get("more_body", False):
                return messages

    def _too_large(self) -> APIError:
        message = f"request body too large (the limit is {self.max_body_bytes} bytes)"
        return APIError(413, message, code="request_too_large")

    @staticmethod
    def _declared_length(headers: list[tuple[bytes, bytes]]) -> int:
        for name, value in headers:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0  # the server's HTTP parser rejects these before we run
        return 0


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
