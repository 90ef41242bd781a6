"""Batched next-token sampling: penalties, temperature, top-k / top-p / min-p.

The engine calls ``SamplingBatch.build`` once per step with each sequence's
parameters (host values), then ``sample(logits, batch)``. The rows are trusted:
the engine checks every request's parameters once, when it arrives. ``sample`` never
synchronises with the host: no ``.item()``, no data-dependent Python branches,
so a CUDA step runs ahead of the CPU.

Order of operations: penalties -> logit bias -> temperature -> top-k -> top-p ->
min-p -> draw. Greedy rows (temperature 0) take the argmax of the penalised logits; a
batch of only greedy rows skips all random work and all truncation.

Logprobs are "raw": ``log_softmax(logits)`` in float32 of the model's own
distribution, before penalties, temperature and truncation (vLLM's default).
The chosen token's logprob is therefore the model's, not the sampler's.

Randomness is counter-based: the noise for vocabulary index ``j`` of a row is
a hash of (seed, step, j) computed with integer tensor ops on the device.
The same (seed, step) draws the same token whatever the batch size, the
row's position in it, or the other rows' parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _signed32(c: int) -> int:
    """The int64 twin of a 32-bit multiplier: ``c`` and ``c - 2**32`` agree mod
    2**32, and the negative form keeps every product of a 32-bit value exact in
    int64 (no signed overflow on any device)."""
    return c - (1 << 32) if c >= 1 << 31 else c


_FMIX_1 = _signed32(0x85EBCA6B)  # murmur3 finaliser constants
_FMIX_2 = _signed32(0xC2B2AE35)
_SEED_SALT = 0x243F6A88  # digits of pi: seed 0 must not hash to key 0
_INCREMENT_SALT = 0x9E3779B9


@dataclass
class SamplingRow:
    """One sequence's parameters for one step."""

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    # HF/vLLM semantics over prompt+output tokens: logit > 0 -> logit / p, else logit * p
    repetition_penalty: float = 1.0
    # OpenAI semantics over output tokens: logit -= presence * (count > 0) + frequency * count
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0  # the request's seed (taken mod 2**64); with `step`, fixes the draw
    step: int = 0  # how many tokens this sequence has generated so far
    num_logprobs: int | None = None  # None: no top-n; n >= 0: top-n logprobs returned
    # (token id, value) added to the logits before sampling; -inf bans a token
    logit_bias: Sequence[tuple[int, float]] = ()
    prompt_ids: Sequence[int] = ()  # only needed when repetition_penalty != 1
    output_ids: Sequence[int] = ()  # only needed when any penalty is set

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class Filters:
    """Truncation parameters of the rows that draw at random; None = no row uses it."""

    top_k: Tensor | None  # (R, 1) int64, 0 = off
    top_p: Tensor | None  # (R, 1) float32, 1 = off
    min_p: Tensor | None  # (R, 1) float32, 0 = off
    max_top_k: int  # largest k asked
    # candidates top-p looks at: max_top_k when every top-p row also sets top-k
    # (the rest is cut anyway, and a partial topk is far cheaper than a full sort), else V
    top_p_width: int


@dataclass
class Penalties:
    """Penalty inputs of the rows that set any penalty."""

    rows: Tensor  # (P,) int64 rows of the batch
    repetition: Tensor  # (P, 1) float32
    presence: Tensor  # (P, 1) float32
    frequency: Tensor  # (P, 1) float32
    counts: Tensor  # (P, V) float32 occurrences of each token in the output
    seen: Tensor | None  # (P, V) bool token in prompt or output; None if no row repeats-penalises


@dataclass
class Bias:
    """Additive logit biases of the rows that set any: one (row, token, value) per entry."""

    rows: Tensor  # (E,) int64
    tokens: Tensor  # (E,) int64
    values: Tensor  # (E,) float32


@dataclass
class SamplingBatch:
    """Device tensors for one step, built once from the rows' host parameters."""

    size: int  # B
    vocab_size: int  # V
    random_rows: Tensor | None  # (R,) int64 rows that draw at random; None when all B do
    num_random: int  # R; 0 = every row is greedy
    temperature: Tensor  # (R, 1) float32, all > 0
    keys: Tensor  # (R, 2) int64 hash keys from (seed, step): offset and odd increment
    filters: Filters
    penalties: Penalties | None
    num_top: int | None  # n of the top-n logprobs; None when no row asked
    bias: Bias | None = None

    @classmethod
    def build(
        cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str
    ) -> SamplingBatch:
        rand = [i for i, r in enumerate(rows) if r.temperature > 0]
        sel = [rows[i] for i in rand]
        asked = [r.num_logprobs for r in rows if r.num_logprobs is not None]
        return cls(
            size=len(rows),
            vocab_size=vocab_size,
            random_rows=None if len(rand) == len(rows) else _ints(rand, device),
            num_random=len(rand),
            temperature=_floats([r.temperature for r in sel], device),
            keys=_row_keys([r.seed for r in sel], [r.step for r in sel]).to(device),
            filters=_build_filters(sel, vocab_size, device),
            penalties=_build_penalties(rows, vocab_size, device),
            num_top=max(asked) if asked else None,
            bias=_build_bias(rows, device),
        )


@dataclass
class SampleOutput:
    token_ids: Tensor  # (B,) int64
    logprobs: Tensor  # (B,) float32: raw log-probability of the chosen token
    top_ids: Tensor | None  # (B, n) int64, best first; n = max requested num_logprobs
    top_logprobs: Tensor | None  # (B, n) float32


def sample(logits: Tensor, batch: SamplingBatch) -> SampleOutput:
    """Pick one token per row. ``logits``: (B, V), any float dtype; not modified."""
    raw = logits.float()
    lse = torch.logsumexp(raw, dim=-1, keepdim=True)  # (B, 1): raw logprob = logit - lse
    x = raw if batch.penalties is None else apply_penalties(raw, batch.penalties)
    if batch.bias is not None:  # after penalties; logprobs stay the model's own (raw)
        b = batch.bias
        x = x.index_put((b.rows, b.tokens), b.values, accumulate=True)
    token_ids = x.argmax(dim=-1)  # (B,) greedy choice, kept for greedy rows
    if batch.num_random:
        token_ids = _draw_random_rows(x, token_ids, batch)
    top_ids = top_logprobs = None
    if batch.num_top is not None:
        top_vals, top_ids = raw.topk(batch.num_top, dim=-1)  # (B, n), best first
        top_logprobs = top_vals - lse
    logprobs = (raw.gather(1, token_ids[:, None]) - lse).squeeze(1)
    return SampleOutput(token_ids, logprobs, top_ids, top_logprobs)


def apply_penalties(logits: Tensor, pen: Penalties) -> Tensor:
    """Penalised copy of float32 ``logits`` (B, V): repetition first, then
    presence and frequency (vLLM's order). Rows outside ``pen.rows`` are untouched."""
    x = logits[pen.rows]  # (P, V) copy
    if pen.seen is not None:
        scaled = torch.where(x > 0, x / pen.repetition, x * pen.repetition)
        x = torch.where(pen.seen, scaled, x)
    x = x - pen.frequency * pen.counts - pen.presence * (pen.counts > 0)
    return logits.index_copy(0, pen.rows, x)


def apply_filters(logits: Tensor, filters: Filters) -> Tensor:
    """Mask (with -inf) what top-k, then top-p, then min-p remove.

    ``logits``: (R, V) float32, temperature already applied, one row per row of
    ``filters``. top-k keeps logits >= the k-th largest (ties kept; when top-p
    only looks at the best max_top_k candidates, a tie just outside them is
    kept by top-k but not weighed by top-p: negligible for real logits); top-p
    keeps the smallest prefix of the sorted distribution whose mass reaches p
    (at least one token); min-p keeps p >= min_p * p_max.
    """
    x = logits
    if filters.top_p is not None:
        x = _top_k_top_p(x, filters.top_k, filters.top_p, filters.top_p_width)
    elif filters.top_k is not None:
        x = _top_k(x, filters.top_k, filters.max_top_k)
    if filters.min_p is not None:
        # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p); log(0) = -inf keeps all
        floor = x.amax(dim=-1, keepdim=True) + filters.min_p.log()
        x = x.masked_fill(x < floor, -math.inf)
    return x


def gumbel_noise(keys: Tensor, vocab_size: int) -> Tensor:
    """Standard Gumbel noise (R, V) float32 from a counter-based hash.

    Element (r, j) is ``fmix32(offset_r + j * increment_r mod 2**32)``: a Weyl
    sequence through murmur3's finaliser, a bijection of j within a row.
    The top 23 bits give u = (k + 0.5) / 2**23, strictly inside (0, 1) and
    exact in float32; -log(-log u) is then Gumbel, and argmax(logit + Gumbel)
    is an exact draw from softmax(logit) (the exponential race).
    """
    j = torch.arange(vocab_size, dtype=torch.int64, device=keys.device)
    h = j * keys[:, 1:2]  # (R, V); < 2**49, exact
    h += keys[:, 0:1]
    h &= _MASK32
    h = _fmix32_(h) >> 9
    u = h.float().add_(0.5).mul_(2.0**-23)
    return u.log_().neg_().log_().neg_()


# -- helpers -------------------------------------------------------------------------


def _draw_random_rows(x: Tensor, token_ids: Tensor, batch: SamplingBatch) -> Tensor:
    rows = batch.random_rows
    z = x if rows is None else x.index_select(0, rows)  # (R, V)
    z = apply_filters(z / batch.temperature, batch.filters)
    drawn = (z + gumbel_noise(batch.keys, batch.vocab_size)).argmax(dim=-1)  # (R,)
    return drawn if rows is None else token_ids.index_copy(0, rows, drawn)


def _top_k(x: Tensor, k: Tensor, max_k: int) -> Tensor:
    kth = x.topk(max_k, dim=-1).values.gather(1, (k - 1).clamp(min=0))  # (R, 1)
    kth = kth.masked_fill(k == 0, -math.inf)  # rows with top-k off keep everything
    return x.masked_fill(x < kth, -math.inf)


# Candidates a CPU top-p tries before sorting the whole vocabulary.
_TOP_P_PROBE = 1024


def _top_p_probe(x: Tensor, p: Tensor) -> Tensor | None:
    """Top-p from the best ``_TOP_P_PROBE`` tokens, when they hold the nucleus.

    A full sort of a large vocabulary is costly on a CPU core (docs/benchmarks.md); a
    partial topk is far cheaper, and when the candidates' mass (normalised over the whole
    vocabulary) reaches p in every row, every token outside them would be cut by
    the full sort too. Checking that needs the values on the host, so this is for
    the CPU only (on CUDA sample() must not synchronise). None: sort everything.
    """
    if x.device.type != "cpu" or x.shape[-1] <= 2 * _TOP_P_PROBE:
        return None
    cand, order = x.topk(_TOP_P_PROBE, dim=-1)  # (R, probe), sorted
    probs = (cand - x.logsumexp(dim=-1, keepdim=True)).exp()
    mass = probs.cumsum(dim=-1)
    active = p < 1.0
    if not bool(((mass[:, -1:] >= p) | ~active).all()):
        return None
    drop_cand = (mass - probs >= p) & active  # exclusive mass: the first token is kept
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(1, order, ~drop_cand)
    return x.masked_fill(~keep & active, -math.inf)


def _top_k_top_p(x: Tensor, k: Tensor | None, p: Tensor, width: int) -> Tensor:
    """Both filters from one sort of the ``width`` best candidates: masking below
    a threshold commutes with sorting."""
    if k is None and width == x.shape[-1]:
        probed = _top_p_probe(x, p)
        if probed is not None:
            return probed
    if width == x.shape[-1]:
        cand, order = x.sort(dim=-1, descending=True)  # (R, V)
    else:
        cand, order = x.topk(width, dim=-1)  # (R, width), sorted
    if k is not None:
        kth = cand.gather(1, (k - 1).clamp(min=0)).masked_fill(k == 0, -math.inf)  # (R, 1)
        cand = cand.masked_fill(cand < kth, -math.inf)
        x = x.masked_fill(x < kth, -math.inf)
    probs = cand.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exclusive: the first token is always kept
    # p == 1 is off outright: a rounded cumsum may pass 1 before the tail ends
    drop_cand = (mass_before >= p) & (p < 1.0)
    drop = torch.zeros_like(x, dtype=torch.bool).scatter_(1, order, drop_cand)
    return x.masked_fill(drop, -math.inf)


def _fmix32_(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser, in place, on int64 values in [0, 2**32)."""
    h ^= h >> 16
    h.mul_(_FMIX_1).bitwise_and_(_MASK32)
    h ^= h >> 13
    h.mul_(_FMIX_2).bitwise_and_(_MASK32)
    h ^= h >> 16
    return h


def _row_keys(seeds: Sequence[int], steps: Sequence[int]) -> Tensor:
    """(R, 2) int64: per row an offset and an odd increment, hashed from (seed, step)."""
    lo = torch.tensor([s & _MASK32 for s in seeds], dtype=torch.int64)
    hi = torch.tensor([(s >> 32) & _MASK32 for s in seeds], dtype=torch.int64)
    st = torch.tensor([s & _MASK32 for s in steps], dtype=torch.int64)
    k = _fmix32_(_fmix32_(lo ^ _SEED_SALT) ^ hi)
    offset = _fmix32_(k ^ st)
    increment = _fmix32_(offset ^ _INCREMENT_SALT) | 1  # odd: j -> j * inc is a bijection mod 2**32
    return torch.stack([offset, increment], dim=1)


def _k(row: SamplingRow, vocab_size: int) -> int:
    return 0 if row.top_k >= vocab_size else row.top_k


def _top_p_width(rows: Sequence[SamplingRow], ks: Sequence[int], vocab_size: int) -> int:
    top_k_bounds_top_p = all(k > 0 for r, k in zip(rows, ks, strict=True) if r.top_p < 1.0)
    return max(ks, default=0) if top_k_bounds_top_p and any(ks) else vocab_size


def _build_filters(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str
) -> Filters:
    ks = [_k(r, vocab_size) for r in rows]
    use_k = any(k > 0 for k in ks)
    use_p = any(r.top_p < 1.0 for r in rows)
    use_min_p = any(r.min_p > 0.0 for r in rows)
    return Filters(
        # k >= V keeps everything, like k = 0
        top_k=_ints(ks, device)[:, None] if use_k else None,
        top_p=_floats([r.top_p for r in rows], device) if use_p else None,
        min_p=_floats([r.min_p for r in rows], device) if use_min_p else None,
        max_top_k=max(ks, default=0),
        top_p_width=_top_p_width(rows, ks, vocab_size),
    )


def _build_penalties(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str
) -> Penalties | None:
    idx = [i for i, r in enumerate(rows) if r.penalised]
    if not idx:
        return None
    sel = [rows[i] for i in idx]
    outputs = _padded_ids([r.output_ids for r in sel], vocab_size).to(device)
    counts = _count(outputs, vocab_size)
    seen = None
    if any(r.repetition_penalty != 1.0 for r in sel):
        prompts = _padded_ids([r.prompt_ids for r in sel], vocab_size).to(device)
        seen = (counts > 0) | (_count(prompts, vocab_size) > 0)
    return Penalties(
        rows=_ints(idx, device),
        repetition=_floats([r.repetition_penalty for r in sel], device),
        presence=_floats([r.presence_penalty for r in sel], device),
        frequency=_floats([r.frequency_penalty for r in sel], device),
        counts=counts,
        seen=seen,
    )


def _build_bias(rows: Sequence[SamplingRow], device: torch.device | str) -> Bias | None:
    entries = [(i, t, v) for i, r in enumerate(rows) for t, v in r.logit_bias]
    if not entries:
        return None
    return Bias(
        rows=_ints([e[0] for e in entries], device),
        tokens=_ints([e[1] for e in entries], device),
        values=torch.tensor([e[2] for e in entries], dtype=torch.float32, device=device),
    )


def _padded_ids(ids: Sequence[Sequence[int]], vocab_size: int) -> Tensor:
    """(P, L) int64 on the host, padded with ``vocab_size`` (a column dropped after counting)."""
    width = max(1, max(len(t) for t in ids))
    out = torch.full((len(ids), width), vocab_size, dtype=torch.int64)
    for i, t in enumerate(ids):
        if len(t):
            out[i, : len(t)] = torch.as_tensor(t, dtype=torch.int64)
    return out


def _count(ids: Tensor, vocab_size: int) -> Tensor:
    counts = torch.zeros(ids.shape[0], vocab_size + 1, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab_size]  # (P, V)


def _ints(values: Sequence[int], device: torch.device | str) -> Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _floats(values: Sequence[float], device: torch.device | str) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).reshape(-1, 1)
