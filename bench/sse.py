"""Server-Sent Events parsing for OpenAI-style completion streams.

``SSEParser`` turns arbitrary text chunks (as they come off the socket) into
the ``data`` payloads of complete events, following the SSE rules: lines end
in LF, CR or CRLF; a blank line ends an event; several ``data:`` lines join
with a newline; lines starting with ``:`` are comments (keep-alive pings).
``classify`` then says what an OpenAI completion payload carries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

ChunkKind = Literal["content", "usage", "done", "error", "other"]


class SSEParser:
    """Incremental SSE decoder: ``feed`` text, get back the completed events' data."""

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []
        self._pending_cr = False  # a chunk ended in CR: a following LF belongs to it

    def feed(self, text: str) -> list[str]:
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = text.endswith("\r")
        self._buffer += text
        lines = self._buffer.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buffer = lines.pop()  # the unterminated tail waits for more text
        events: list[str] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # event:, id:, retry: do not matter for completions


@dataclass
class Chunk:
    """One parsed payload of a completion stream."""

    kind: ChunkKind
    text: str = ""
    usage: dict[str, Any] | None = None
    error: str = ""


def classify(data: str) -> Chunk:
    """What a ``data`` payload is, with vLLM's rule: a chunk with a non-empty
    ``choices`` list is content (even when its text is empty)."""
    if data.strip() == "[DONE]":
        return Chunk("done")
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        return Chunk("error", error=f"not JSON: {data[:200]!r}")
    if not isinstance(payload, dict):
        return Chunk("other")
    if payload.get("error"):
        err = payload["error"]
        message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        return Chunk("error", error=message)
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else None
    choices = payload.get("choices")
    if choices:
        first = choices[0]
        text = first.get("text")
        if text is None:  # chat completions put the delta elsewhere
            text = (first.get("delta") or {}).get("content") or ""
        return Chunk("content", text=text, usage=usage)
    if usage is not None:
        return Chunk("usage", usage=usage)
    return Chunk("other")
