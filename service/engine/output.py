"""Turning sampled token ids into text deltas: UTF-8 safe, stop strings held back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TextAssembler:
    """Text deltas of one request.

    The detokenizer already holds back incomplete UTF-8 characters; on top of
    that, text that may be the beginning of a stop string is held until the next
    tokens show whether it is one. A matched stop string and everything after
    it is never emitted.
    """

    def __init__(self, detokenizer: Detokenizer, stop: Sequence[str]) -> None:
        self.detokenizer = detokenizer
        self.stop = [s for s in stop if s]
        self.held = ""

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Delta to emit now and the stop string that matched, if any."""
        text = self.held + self.detokenizer.push(token_id)
        return self._split(text, final=False)

    def flush(self) -> tuple[str, str | None]:
        """Everything still held, at the end of the request."""
        text = self.held + self.detokenizer.flush()
        return self._split(text, final=True)

    def _split(self, text: str, final: bool) -> tuple[str, str | None]:
        if not self.stop:
            self.held = ""
            return text, None
        match = self._first_stop(text)
        if match is not None:
            index, stop = match
            self.held = ""
            return text[:index], stop
        hold = 0 if final else self._partial_stop_len(text)
        self.held = text[len(text) - hold :]
        return text[: len(text) - hold], None

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = text.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
