"""uvicorn's h11 protocol with two guards uvicorn lacks: a deadline for each request
and a cap on open connections.

Why here and not in ASGI middleware: the application is called only once a
request head is complete, so a client trickling its head a byte at a time is
invisible to it; and uvicorn's ``limit_concurrency`` answers 503 only when a
head completes, so connections that never finish one are never refused. Both
guards therefore sit where the bytes arrive, in the protocol (tested in
tests/integration/test_slow_clients.py against a real server).

- ``request_timeout``: from the moment a connection is ready for a request (its
  opening, or the end of the previous response) the client has this long to send
  the whole request, head and body. A late head gets ``408`` and the connection
  closes; a late body closes the connection (the application sees a disconnect).
  Idle keep-alive connections keep uvicorn's shorter ``timeout_keep_alive``.
- ``max_connections``: a connection beyond the cap is closed at once, before a
  byte is read.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_BODY = (
    b'{"error":{"message":"the request was not received in time",'
    b'"type":"invalid_request_error","param":null,"code":"request_timeout"}}'
)
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + b"content-length: %d\r\n\r\n" % len(_TIMEOUT_BODY)
    + _TIMEOUT_BODY
)


class GuardedH11Protocol(H11Protocol):
    request_timeout: float = 15.0
    max_connections: int = 512

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(cast(asyncio.Transport, transport))
        self._deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            self.transport.close()  # refused: connection_lost forgets it
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the whole request is in: the response may take its time

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            self.transport.write(_TIMEOUT_RESPONSE)  # no request started: say why
        self.transport.close()


def guarded_protocol(request_timeout: float, max_connections: int) -> type[Any]:
    """The protocol class uvicorn should use, with these bounds."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"request_timeout": request_timeout, "max_connections": max_connections},
    )
