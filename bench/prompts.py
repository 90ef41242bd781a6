"""Prompts of an exact token length, cut from the corpus kept in the repo.

A window of corpus tokens is decoded to text and re-encoded; decoding and
encoding do not always round-trip to the same count (merges across the cut,
a BOS the server adds), so the window is widened or narrowed until the text
counts exactly the length asked for, as the server will count it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from bench.loadgen import Prompt

CORPUS = Path(__file__).parent / "data" / "corpus.txt"


class Codec(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def corpus_text() -> str:
    return CORPUS.read_text(encoding="utf-8")


def corpus_ids(codec: Codec, min_tokens: int) -> list[int]:
    """Corpus tokens, the text repeated until there are at least ``min_tokens``."""
    text = corpus_text()
    ids = codec.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("the corpus encodes to no tokens")
    repeats = -(-min_tokens // len(ids))
    if repeats > 1:
        ids = codec.encode("\n\n".join([text] * repeats), add_special_tokens=False)
    return ids


def exact_prompt(codec: Codec, ids: Sequence[int], start: int, num_tokens: int) -> Prompt:
    """Text from ``ids[start:]`` that the server will count as ``num_tokens`` tokens
    (or the closest count found when no window gives exactly that)."""
    lo, hi = 0, len(ids) - start + 1  # windows known to count too few / too many tokens
    width = min(num_tokens, hi - 1)
    best: Prompt | None = None
    for _ in range(24):
        text = codec.decode(ids[start : start + width])
        got = len(codec.encode(text, add_special_tokens=True))
        if best is None or abs(got - num_tokens) < abs(best.num_tokens - num_tokens):
            best = Prompt(prompt=text, num_tokens=got)
        if got == num_tokens:
            break
        if got < num_tokens:
            lo = max(lo, width)
        else:
            hi = min(hi, width)
        if hi - lo <= 1:
            break
        # Step by the miss, kept strictly inside the bracket so the search always moves.
        width = min(max(width + num_tokens - got, lo + 1), hi - 1)
    assert best is not None  # the loop runs at least once
    return best


def build_prompts(codec: Codec, num_tokens: int, count: int, seed: int = 0) -> list[Prompt]:
    """``count`` prompts of ``num_tokens`` tokens from random corpus offsets."""
    if num_tokens <= 0 or count <= 0:
        raise ValueError(f"num_tokens and count must be positive, got {num_tokens} and {count}")
    ids = corpus_ids(codec, 2 * num_tokens + 64)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - num_tokens - 32, size=count)
    return [exact_prompt(codec, ids, int(s), num_tokens) for s in starts]


def prompt_ids(codec: Codec, num_tokens: int, offset: int = 0) -> list[int]:
    """Exactly ``num_tokens`` corpus token ids (for offline baselines that take ids)."""
    ids = corpus_ids(codec, offset + num_tokens)
    return list(ids[offset : offset + num_tokens])
