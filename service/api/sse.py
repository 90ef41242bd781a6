"""Server-Sent Events: encoding and a response that notices a client leaving.

Each payload is one ``data: <json>`` line. JSON never contains a raw newline
(``json.dumps`` escapes them), so an event can never be split by its content.
After the last payload the stream ends with ``data: [DONE]``. An error after
the stream began is an in-band ``data: {"error": ...}`` event, then ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.errors import as_api_error

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# Each Server-Sent Event: ``data`` is a JSON payload, or "[DONE]" after the last one.
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
    },
    "required": ["data"],
}
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        "description": "JSON, or Server-Sent Events with `stream: true`",
    }
}


def encode_event(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return f"data: {data}\n\n".encode()


async def sse_stream(payloads: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Encodes payloads, turns a failure into an in-band error event, and ends with [DONE]."""
    try:
        async for payload in payloads:
            yield encode_event(payload)
    except Exception as exc:  # after the 200 went out, errors travel in-band
        yield encode_event(as_api_error(exc).body())
    yield DONE


async def named_event_stream(payloads: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Events named by their ``type`` (``event: <type>`` then ``data: <json>``), as the
    Responses API streams them; no ``[DONE]``. An error after the start is an ``error`` event."""
    try:
        async for payload in payloads:
            yield f"event: {payload.get('type', 'message')}\n".encode() + encode_event(payload)
    except Exception as exc:
        body = as_api_error(exc).body()["error"]
        yield b"event: error\n" + encode_event({"type": "error", **body})


async def ndjson_stream(payloads: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """One JSON object per line (Ollama's streaming); an error is an ``{"error": ...}`` line."""
    try:
        async for payload in payloads:
            yield _json_line(payload)
    except Exception as exc:
        yield _json_line({"error": as_api_error(exc).body()["error"]["message"]})


def _json_line(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return f"{data}\n".encode()


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that stops producing as soon as the client leaves.

    Starlette only watches for ``http.disconnect`` on older ASGI spec versions;
    this response always does, so a client that goes away between two tokens
    cancels the stream at once and ``on_close`` releases the engine request.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        payloads: AsyncIterator[dict[str, Any]],
        on_close: Callable[[], Awaitable[None]] | None = None,
        headers: dict[str, str] | None = None,
        encode: Callable[[AsyncIterator[dict[str, Any]]], AsyncIterator[bytes]] = sse_stream,
    ) -> None:
        super().__init__(encode(payloads), headers={**SSE_HEADERS, **(headers or {})})
        self._payloads = payloads
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await _wait_for_disconnect(receive)
                group.cancel_scope.cancel()
        except* OSError:  # uvicorn raises it when sending to a closed connection
            logger.debug("client went away during a stream")
        finally:
            await _close(self.body_iterator)
            await _close(self._payloads)
            if self._on_close is not None:
                with anyio.CancelScope(shield=True):
                    await self._on_close()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _close(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


class NDJSONResponse(SSEResponse):
    """Newline-delimited JSON with the same disconnect handling."""

    media_type = "application/x-ndjson"

    def __init__(
        self,
        payloads: AsyncIterator[dict[str, Any]],
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(payloads, on_close, encode=ndjson_stream)
