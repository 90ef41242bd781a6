"""SentencePiece-style vocabularies: GGUF ``tokenizer.ggml.model = llama`` files rebuilt as
a ``tokenizers`` BPE, and the spelling rules that turn their tokens back into bytes.

SentencePiece writes a space as U+2581 (▁) and, with byte fallback, a byte it
has no piece for as a token ``<0xNN>``. A GGUF file keeps the pieces, their
scores and token types but no merges; the merges are recovered from the
vocabulary: every piece that splits into two pieces gives a merge, ranked by
the piece's score (Gemma: by its position in the vocabulary, since its scores
do not follow merge order). The pipeline around the BPE model is the one
transformers builds for ``LlamaTokenizer`` (Metaspace pre-tokenizer, a decoder
that strips the first space) and ``GemmaTokenizer`` (spaces replaced, nothing
prepended), so ids equal transformers' for the same file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

SPACE = "\u2581"
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
GEMMA_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})


class SentencePieceError(ValueError):
    """A vocabulary that cannot be rebuilt."""


def from_gguf_vocab(
    tokens: Sequence[str],
    scores: Sequence[float] | None,
    types: Sequence[int],
    arch: str,
    unk_id: int | None,
) -> Tokenizer:
    """A ``tokenizers`` BPE with byte fallback for a GGUF SentencePiece vocabulary."""
    gemma = arch in GEMMA_ARCHS
    if gemma:
        # Gemma files store runs of spaces as real spaces; its pieces spell them as ▁.
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if gemma:
        rank: dict[str, float] = {t: -float(i) for i, t in enumerate(tokens)}
    else:
        if scores is None or len(scores) != len(tokens):
            raise SentencePieceError("tokenizer.ggml.scores missing or of the wrong length")
        rank = dict(zip(tokens, (float(s) for s in scores), strict=True))
    # As transformers builds them: Gemma's BPE names its unknown token, Llama's none
    # (byte fallback covers every character).
    unk = None
    if gemma:
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    try:
        model = BPE(
            vocab=vocab,
            merges=recover_merges(vocab, rank),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    except Exception as e:  # the Rust side raises a bare Exception
        raise SentencePieceError(f"invalid vocabulary: {e}") from e
    backend = Tokenizer(model)
    if gemma:
        backend.normalizer = normalizers.Replace(" ", SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence(
            [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE, prepend_scheme="first", split=False
        )
        backend.decoder = decoders.Sequence(
            [
                decoders.Replace(SPACE, " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _USER_DEFINED
        ]
    )
    return backend


def recover_merges(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary: each split of a piece into two pieces, best
    ranked piece first; ties go to the longer left, then longer right part (the
    order transformers uses, so that equal-rank merges resolve alike)."""
    found: list[tuple[float, int, int, int]] = []
    pairs: list[tuple[str, str]] = []
    for piece, score in rank.items():
        local = [
            (piece[:i], piece[i:])
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        if len(local) > 1:
            local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        for left, right in local:
            # -index: equal keys keep their order under the descending sort
            found.append((score, len(left), len(right), -len(pairs)))
            pairs.append((left, right))
    found.sort(reverse=True)
    return [pairs[-m[3]] for m in found]


# -- spelling --------------------------------------------------------------------------


def is_sentencepiece(decoder: Any) -> bool:
    """Whether a ``tokenizers`` decoder (as its JSON dict) undoes SentencePiece spelling."""
    kinds = _decoder_kinds(decoder)
    return "ByteFallback" in kinds or "Metaspace" in kinds


def strips_first_space(decoder: Any) -> bool:
    """Whether decoding drops the space SentencePiece prepended to the text."""
    for step in _decoder_steps(decoder):
        if step.get("type") == "Strip" and step.get("start", 0) >= 1:
            return True
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never":
            return True
    return False


def piece_bytes(piece: str) -> bytes:
    """The bytes a SentencePiece token stands for: ``<0xNN>`` is one byte, ▁ a space."""
    match = BYTE_TOKEN.fullmatch(piece)
    if match:
        return bytes((int(match.group(1), 16),))
    return piece.replace(SPACE, " ").encode()


def _decoder_steps(decoder: Any) -> list[dict[str, Any]]:
    if not isinstance(decoder, dict):
        return []
    if decoder.get("type") == "Sequence":
        return [d for d in decoder.get("decoders", []) if isinstance(d, dict)]
    return [decoder]


def _decoder_kinds(decoder: Any) -> set[str]:
    return {str(step.get("type")) for step in _decoder_steps(decoder)}
