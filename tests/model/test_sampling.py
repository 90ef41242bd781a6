"""Batched sampling: greedy, penalties, filters, seeded draws, logprobs, validation."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import model.sampling as sampling
from model.sampling import SamplingBatch, SamplingRow, apply_filters, gumbel_noise, sample

NEG = -math.inf


def build(rows: list[SamplingRow], vocab: int, device: str = "cpu") -> SamplingBatch:
    return SamplingBatch.build(rows, vocab, device)


def reference_penalise(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Penalties written out token by token."""
    out = logits.clone()
    for b, row in enumerate(rows):
        for t in set(row.prompt_ids) | set(row.output_ids):
            v = out[b, t].item()
            out[b, t] = v / row.repetition_penalty if v > 0 else v * row.repetition_penalty
        for t, n in Counter(row.output_ids).items():
            out[b, t] -= row.frequency_penalty * n + row.presence_penalty
    return out


# -- greedy and penalties --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = sample(logits, build([SamplingRow()] * 5, 300))
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32


def penalty_rows() -> list[SamplingRow]:
    return [
        SamplingRow(repetition_penalty=1.3, prompt_ids=[0, 1, 2, 7], output_ids=[3, 3, 9]),
        SamplingRow(),  # no penalty: must be untouched
        SamplingRow(presence_penalty=0.7, frequency_penalty=0.4, output_ids=[5, 5, 5, 6]),
        SamplingRow(
            repetition_penalty=0.8,
            presence_penalty=-0.5,
            frequency_penalty=1.1,
            prompt_ids=[4, 4, 11],
            output_ids=[11, 2, 2],
        ),
    ]


def test_penalties_match_reference() -> None:
    rows = penalty_rows()
    logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(1)) * 3
    batch = build(rows, 12)
    assert batch.penalties is not None
    got = sampling.apply_penalties(logits, batch.penalties)
    torch.testing.assert_close(got, reference_penalise(logits, rows))
    assert torch.equal(got[1], logits[1])


def test_greedy_with_penalties_is_argmax_of_penalised() -> None:
    rows = penalty_rows()
    # make the most-penalised tokens the argmax so the penalties must change the choice
    logits = torch.zeros(4, 12)
    logits[0, 3], logits[0, 4] = 2.0, 1.6  # 3 is in the output: 2.0 / 1.3 < 1.6
    logits[2, 5], logits[2, 8] = 3.0, 1.5  # 5 three times: 3 - 1.2 - 0.7 < 1.5
    logits[3, 11], logits[3, 4] = 0.5, 0.45  # 0.5 / 0.8 - 1.1 + 0.5 < 0.45 / 0.8
    logits[1, 7] = 1.0
    out = sample(logits, build(rows, 12))
    expected = reference_penalise(logits, rows).argmax(-1)
    assert out.token_ids.tolist() == expected.tolist() == [4, 7, 8, 4]


def test_sample_does_not_modify_logits() -> None:
    logits = torch.randn(4, 12)
    before = logits.clone()
    rows = [SamplingRow(temperature=0.7, top_p=0.9, top_k=3, min_p=0.1, seed=i) for i in range(4)]
    rows[0] = penalty_rows()[0]
    sample(logits, build(rows, 12))
    assert torch.equal(logits, before)


# -- filters -----------------------------------------------------------------------


PROBS = [0.05, 0.5, 0.1, 0.2, 0.15]  # shuffled so the filters must sort


def filtered(rows: list[SamplingRow]) -> torch.Tensor:
    logits = torch.tensor(PROBS).log().expand(len(rows), -1)
    return apply_filters(logits, build(rows, len(PROBS)).filters)


def kept(x: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.isfinite(r).nonzero().flatten().tolist()) for r in x]


def test_top_k_mask() -> None:
    assert kept(filtered([SamplingRow(temperature=1, top_k=2)])) == [[1, 3]]


def test_top_p_mask() -> None:
    rows = [SamplingRow(temperature=1, top_p=p) for p in (0.45, 0.6, 0.8, 0.99)]
    # 0.6: 0.5 (mass before 0) and 0.2 (before 0.5 < 0.6); 0.15 has 0.7 before it
    assert kept(filtered(rows)) == [[1], [1, 3], [1, 3, 4], [0, 1, 2, 3, 4]]


def test_min_p_mask() -> None:
    # min_p 0.25: keep p >= 0.125; min_p 1: only the most likely token
    rows = [SamplingRow(temperature=1, min_p=0.25), SamplingRow(temperature=1, min_p=1.0)]
    assert kept(filtered(rows)) == [[1, 3, 4], [1]]


def test_top_k_applies_before_top_p() -> None:
    # after top-k 3 the mass is [.588, .235, .176]: p 0.8 cuts the third; alone it keeps it
    rows = [
        SamplingRow(temperature=1, top_k=3, top_p=0.8),
        SamplingRow(temperature=1, top_p=0.8),
        SamplingRow(temperature=1, top_k=3, top_p=0.8, min_p=0.45),
    ]
    assert kept(filtered(rows)) == [[1, 3], [1, 3, 4], [1]]


def test_top_p_within_top_k_candidates() -> None:
    """Every top-p row also sets top-k: the cheaper partial-sort path, same masks."""
    rows = [SamplingRow(temperature=1, top_k=3, top_p=0.8), SamplingRow(temperature=1, top_k=2)]
    batch = build(rows, len(PROBS))
    assert batch.filters.top_p_width == 3
    assert kept(filtered(rows)) == [[1, 3], [1, 3]]


@pytest.mark.parametrize("other", [{"top_k": 5}, {"top_k": 5, "top_p": 0.5, "min_p": 0.2}])
def test_rows_with_filters_off_are_untouched(other: dict[str, float]) -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(2))
    logits[3] = -30.0
    logits[3, 0] = 0.0  # p_max rounds to 1: a rounded cumsum reaches 1 before the tail
    rows = [
        SamplingRow(temperature=1, **other),  # type: ignore[arg-type]
        SamplingRow(temperature=1),
        SamplingRow(temperature=1, top_k=10**6),  # k >= V keeps everything
        SamplingRow(temperature=1),
    ]
    out = apply_filters(logits, build(rows, 1000).filters)
    assert torch.isinf(out[0]).sum() >= 995
    assert torch.equal(out[1:], logits[1:])


def test_filters_keep_at_least_one_token() -> None:
    logits = torch.tensor([[5.0, 5.0, 1.0], [0.0, 0.0, 0.0]])
    rows = [SamplingRow(temperature=1, top_p=1e-6, min_p=1.0)] * 2
    out = apply_filters(logits, build(rows, 3).filters)
    assert (torch.isfinite(out).sum(-1) >= 1).all()


# -- seeded randomness ---------------------------------------------------------------


def test_same_seed_same_token_whatever_the_batch() -> None:
    vocab = 4000
    gen = torch.Generator().manual_seed(3)
    target_logits = torch.randn(vocab, generator=gen) * 2
    others = torch.randn(8, vocab, generator=gen)
    neighbours = [
        SamplingRow(),
        SamplingRow(temperature=1.5, top_k=7, seed=99),
        SamplingRow(temperature=0.3, repetition_penalty=1.2, prompt_ids=[1, 2], seed=5),
        SamplingRow(temperature=1.0, top_p=0.5, step=3),
        SamplingRow(temperature=2.0, min_p=0.1, num_logprobs=3, seed=1),
        SamplingRow(temperature=0.9, presence_penalty=1.0, output_ids=[4]),
        SamplingRow(),
        SamplingRow(temperature=1.0, seed=12345),
    ]
    for seed in range(40):
        row = SamplingRow(temperature=1.0, top_p=0.95, seed=seed, step=7)
        alone = sample(target_logits[None], build([row], vocab)).token_ids[0]
        rows = neighbours[:5] + [row] + neighbours[5:]  # position 5 of 9
        logits = torch.cat([others[:5], target_logits[None], others[5:]])
        in_batch = sample(logits, build(rows, vocab)).token_ids[5]
        assert alone == in_batch, seed


def test_noise_is_exactly_reproducible_per_row() -> None:
    keys = sampling._row_keys([7, 2**40 + 3, -5], [0, 11, 3])
    full = gumbel_noise(keys, 777)
    for r in range(3):
        assert torch.equal(full[r], gumbel_noise(keys[r : r + 1], 777)[0])
    assert torch.isfinite(full).all()


def test_different_seeds_or_steps_draw_differently() -> None:
    vocab = 1000
    flat = torch.zeros(1, vocab)

    def draw(seed: int, step: int) -> int:
        row = SamplingRow(temperature=1.0, seed=seed, step=step)
        return int(sample(flat, build([row], vocab)).token_ids[0])

    assert len({draw(s, 0) for s in range(30)}) >= 25
    assert len({draw(0, t) for t in range(30)}) >= 25
    assert len({draw(s, 0) for s in (0, 2**32, 2**33, -1)}) == 4  # high seed bits count


def chi_square(rows: list[SamplingRow], logits: torch.Tensor, expected: torch.Tensor) -> float:
    out = sample(logits.expand(len(rows), -1), build(rows, logits.shape[-1]))
    counts = torch.bincount(out.token_ids, minlength=logits.shape[-1]).float()
    want = expected * len(rows)
    support = want > 0
    assert counts[~support].sum() == 0, "drew a token the filters removed"
    return float(((counts[support] - want[support]) ** 2 / want[support]).sum())


# chi-square critical values at p = 1e-4: df 2 -> 18.4, df 5 -> 25.7
N = 20000
LOGITS = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -3.0])


def test_draws_follow_softmax_over_seeds() -> None:
    rows = [SamplingRow(temperature=1.0, seed=s) for s in range(N)]
    assert chi_square(rows, LOGITS, LOGITS.softmax(-1)) < 25.7


def test_draws_follow_softmax_over_steps() -> None:
    rows = [SamplingRow(temperature=0.5, seed=42, step=t) for t in range(N)]
    assert chi_square(rows, LOGITS, (LOGITS / 0.5).softmax(-1)) < 25.7


def test_draws_follow_truncated_softmax() -> None:
    rows = [SamplingRow(temperature=1.0, top_k=3, seed=s) for s in range(N)]
    expected = torch.zeros(6)
    top = [3, 0, 1]
    expected[top] = LOGITS[top].softmax(-1)
    assert chi_square(rows, LOGITS, expected) < 18.4


def test_a_biased_sampler_fails_the_bound() -> None:
    """The bound above is tight enough to catch a sampler off by a little."""
    rows = [SamplingRow(temperature=1.0, seed=s) for s in range(N)]
    assert chi_square(rows, LOGITS, (LOGITS * 1.05).softmax(-1)) > 25.7


def test_all_greedy_skips_random_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("noise drawn for a greedy batch")

    monkeypatch.setattr(sampling, "gumbel_noise", fail)
    rows = [SamplingRow(top_k=3, top_p=0.5, min_p=0.5)] * 3
    out = sample(torch.randn(3, 50), build(rows, 50))
    assert out.token_ids.shape == (3,)


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(4))
    rows = [SamplingRow(temperature=(2.0 if i % 2 else 0.0), seed=i) for i in range(6)]
    out = sample(logits, build(rows, 500))
    assert torch.equal(out.token_ids[::2], logits[::2].argmax(-1))


# -- logprobs ---------------------------------------------------------------------------


def test_logprobs_are_raw_at_the_chosen_tokens() -> None:
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(5)).half()
    every = list(range(200))  # penalise every token so the chosen one is always penalised
    rows = [
        SamplingRow(temperature=0.7, top_k=20, seed=1),
        SamplingRow(repetition_penalty=0.5, prompt_ids=every),
        SamplingRow(temperature=1.3, presence_penalty=1.0, output_ids=every, seed=2),
        SamplingRow(),
    ]
    out = sample(logits, build(rows, 200))
    raw = logits.float().log_softmax(-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids is None and out.top_logprobs is None


def test_top_logprobs_sorted_and_correct() -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(6))
    rows = [
        SamplingRow(num_logprobs=2),
        SamplingRow(temperature=1.0, num_logprobs=5),
        SamplingRow(),
    ]
    out = sample(logits, build(rows, 100))
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == out.top_logprobs.shape == (3, 5)
    raw = logits.log_softmax(-1)
    want_vals, want_ids = raw.sort(-1, descending=True)
    assert torch.equal(out.top_ids, want_ids[:, :5])
    torch.testing.assert_close(out.top_logprobs, want_vals[:, :5])
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_zero_top_logprobs_is_an_empty_column() -> None:
    out = sample(torch.randn(2, 10), build([SamplingRow(num_logprobs=0), SamplingRow()], 10))
    assert out.top_ids is not None and out.top_ids.shape == (2, 0)


# -- validation ---------------------------------------------------------------------------


# -- device ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_without_host_sync() -> None:
    vocab = 49152
    logits = torch.randn(16, vocab, generator=torch.Generator().manual_seed(7))
    rows = [
        SamplingRow(
            temperature=0.8 if i % 3 else 0.0,
            top_k=40 if i % 2 else 0,
            top_p=0.9 if i % 4 else 1.0,
            min_p=0.05 if i % 5 == 0 else 0.0,
            repetition_penalty=1.2 if i == 3 else 1.0,
            prompt_ids=[1, 2, 3],
            seed=i,
            step=i * 3,
            num_logprobs=2 if i == 1 else None,
        )
        for i in range(16)
    ]
    cpu = sample(logits, build(rows, vocab))
    batch = build(rows, vocab, "cuda")
    gpu_logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = sample(gpu_logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(gpu.token_ids.cpu(), cpu.token_ids)
    keys = sampling._row_keys(list(range(16)), [3] * 16)
    assert torch.equal(gumbel_noise(keys.cuda(), vocab).cpu(), gumbel_noise(keys, vocab))


def test_cpu_top_p_probe_matches_the_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU shortcut (best candidates only) masks exactly what the full sort masks,
    and falls back to the sort when a row's nucleus is wider than the candidates."""
    vocab = 8 * sampling._TOP_P_PROBE
    gen = torch.Generator().manual_seed(3)
    peaked = torch.randn(3, vocab, generator=gen) * 4.0  # nucleus well inside the probe
    flat = torch.randn(1, vocab, generator=gen) * 0.01  # nucleus of ~90% of the vocabulary
    logits = torch.cat([peaked, flat])
    rows = [SamplingRow(temperature=1.0, top_p=p) for p in (0.5, 0.9, 1.0, 0.9)]
    filters = build(rows, vocab).filters

    calls: list[bool] = []
    probe = sampling._top_p_probe

    def spy(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
        out = probe(x, p)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(sampling, "_top_p_probe", spy)
    fast = apply_filters(peaked, build(rows[:3], vocab).filters)
    mixed = apply_filters(logits, filters)
    monkeypatch.setattr(sampling, "_top_p_probe", lambda x, p: None)
    full = apply_filters(logits, filters)

    assert calls == [True, False]  # the flat row forces the full sort
    assert torch.equal(torch.isinf(fast), torch.isinf(full[:3]))
    assert torch.equal(mixed, full)
    kept = (~torch.isinf(full)).sum(dim=-1)
    assert kept[2] == vocab  # p == 1 keeps everything
    assert 1 <= kept[0] < kept[1] < sampling._TOP_P_PROBE
