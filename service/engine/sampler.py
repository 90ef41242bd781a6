"""Sampling one step's rows, so that a request that breaks sampling fails alone."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from model.sampling import SamplingBatch, SamplingRow, sample
from service.engine.types import TokenLogprob

# A sampled token with its logprobs, or the exception its request ran into.
Sampled = tuple[int, TokenLogprob | None] | Exception


def sample_rows(
    rows: Sequence[SamplingRow | Exception], logits: Tensor, vocab_size: int
) -> list[Sampled]:
    """One result per row of ``logits`` (N, vocab). A row given as an exception (its
    parameters could not be built) stays that exception."""
    good_rows = [r for r in rows if not isinstance(r, Exception)]
    if len(good_rows) == len(rows):  # the common case: every row's parameters were built
        return _sample_isolated(good_rows, logits, vocab_size)
    good = [i for i, r in enumerate(rows) if not isinstance(r, Exception)]
    drawn = iter(_sample_isolated(good_rows, logits[good], vocab_size) if good else [])
    return [r if isinstance(r, Exception) else next(drawn) for r in rows]


def _plain_greedy(row: SamplingRow) -> bool:
    return (
        row.temperature == 0
        and row.num_logprobs is None
        and not row.penalised
        and not row.logit_bias
    )


def _sample_isolated(rows: list[SamplingRow], logits: Tensor, vocab_size: int) -> list[Sampled]:
    if all(_plain_greedy(r) for r in rows):
        # The common case needs no sampling machinery: one argmax, one host transfer.
        return [(t, None) for t in logits.argmax(dim=-1).tolist()]
    try:
        return _draw(rows, logits, vocab_size)
    except Exception:
        # Find the culprit: each row alone, so one bad request fails alone.
        out: list[Sampled] = []
        for j, row in enumerate(rows):
            try:
                out.extend(_draw([row], logits[j : j + 1], vocab_size))
            except Exception as exc:
                out.append(exc)
        return out


def _draw(rows: list[SamplingRow], logits: Tensor, vocab_size: int) -> list[Sampled]:
    batch = SamplingBatch.build(rows, vocab_size, logits.device)
    result = sample(logits, batch)
    ids = result.token_ids.tolist()
    if batch.num_top is None or result.top_ids is None or result.top_logprobs is None:
        return [(t, None) for t in ids]
    lps = result.logprobs.tolist()
    top_ids, top_lps = result.top_ids.tolist(), result.top_logprobs.tolist()
    out: list[Sampled] = []
    for j, (row, t) in enumerate(zip(rows, ids, strict=True)):
        lp = None
        if row.num_logprobs is not None:
            n = row.num_logprobs
            lp = TokenLogprob(t, lps[j], list(zip(top_ids[j][:n], top_lps[j][:n], strict=True)))
        out.append((t, lp))
    return out
