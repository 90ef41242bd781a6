"""Metric definitions on synthetic timelines whose answers are known by hand."""

import math

import pytest

from bench.metrics import SLO, RequestRecord, Stats, span, summarize


def record(
    send: float, chunks: list[float], tokens: int | None = None, error: str = ""
) -> RequestRecord:
    end = (chunks[-1] if chunks else send) + 0.001
    return RequestRecord(
        send_time=send,
        prompt_len=10,
        chunk_times=chunks,
        end_time=end,
        output_tokens=tokens,
        prompt_tokens=12 if tokens is not None else None,
        error=error,
    )


def test_per_request_ttft_itl_e2el_tpot():
    r = record(10.0, [10.2, 10.3, 10.5, 10.6], tokens=4)
    assert r.ttft == pytest.approx(0.2)
    assert r.itl == pytest.approx([0.1, 0.2, 0.1])
    assert r.e2el == pytest.approx(0.6)
    assert r.tpot == pytest.approx(0.4 / 3)


def test_tpot_uses_server_token_count_not_chunk_count():
    # Two chunks carrying 5 tokens in all: TPOT divides by 4, ITL has one gap.
    r = record(0.0, [1.0, 2.0], tokens=5)
    assert r.tpot == pytest.approx(0.25)
    assert r.itl == pytest.approx([1.0])


def test_single_token_request_has_no_tpot_and_counts_as_zero_for_goodput():
    r = record(0.0, [0.05], tokens=1)
    assert r.tpot is None
    assert SLO(ttft_ms=100, tpot_ms=1).met_by(r)


def test_failed_requests_are_excluded_and_counted():
    ok = record(0.0, [0.1, 0.2], tokens=2)
    http_error = record(0.0, [], error="HTTP 500: boom")
    no_chunk = record(0.0, [])
    s = summarize([ok, http_error, no_chunk], duration=1.0)
    assert (s.completed, s.failed) == (1, 2)
    assert s.errors == ["HTTP 500: boom", "no content chunk"]
    assert s.total_output_tokens == 2
    assert s.total_input_tokens == 12  # usage.prompt_tokens wins over the client's count


def test_throughput_over_span_from_first_send_to_last_completion():
    a = record(1.0, [1.5, 2.0, 2.5], tokens=3)  # ends at 2.501
    b = record(1.5, [3.0, 3.5], tokens=2)  # ends at 3.501
    assert span([a, b]) == pytest.approx(2.501)
    s = summarize([a, b])
    assert s.duration_s == pytest.approx(2.501)
    assert s.request_throughput == pytest.approx(2 / 2.501)
    assert s.output_throughput == pytest.approx(5 / 2.501)
    assert s.total_token_throughput == pytest.approx((5 + 24) / 2.501)


def test_itl_is_pooled_over_chunks_not_averaged_per_request():
    # Request a: 9 gaps of 10 ms; request b: 1 gap of 1000 ms.
    a = record(0.0, [0.1 + 0.01 * i for i in range(10)], tokens=10)
    b = record(0.0, [0.1, 1.1], tokens=2)
    s = summarize([a, b], duration=2.0)
    assert s.itl_ms.count == 10
    assert s.itl_ms.mean == pytest.approx((9 * 10 + 1000) / 10)
    assert s.itl_ms.median == pytest.approx(10.0)
    # TPOT is per request: (0.09/9, 1.0/1) -> 10 ms and 1000 ms.
    assert s.tpot_ms.mean == pytest.approx(505.0)


def test_percentiles_interpolate_linearly():
    st = Stats.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st.percentiles["p50"] == 3.0
    assert st.percentiles["p90"] == pytest.approx(4.6)
    assert st.percentiles["p99"] == pytest.approx(4.96)
    assert (st.min, st.max, st.mean) == (1.0, 5.0, 3.0)


def test_goodput_counts_requests_meeting_every_slo():
    fast = record(0.0, [0.05, 0.07, 0.09], tokens=3)  # TTFT 50 ms, TPOT 20 ms
    slow_start = record(0.0, [0.5, 0.52, 0.54], tokens=3)  # TTFT 500 ms
    slow_tokens = record(0.0, [0.05, 0.25, 0.45], tokens=3)  # TPOT 200 ms
    s = summarize([fast, slow_start, slow_tokens], duration=2.0, slo=SLO(ttft_ms=100, tpot_ms=50))
    assert s.goodput == pytest.approx(0.5)
    only_ttft = summarize([fast, slow_start, slow_tokens], duration=2.0, slo=SLO(ttft_ms=100))
    assert only_ttft.goodput == pytest.approx(1.0)
    assert summarize([fast], duration=1.0).goodput is None


def test_empty_run_gives_nan_not_an_exception():
    s = summarize([], duration=0.0)
    assert s.completed == 0
    assert math.isnan(s.output_throughput) and math.isnan(s.ttft_ms.mean)


def test_summary_round_trips_through_its_dict():
    from bench.metrics import Summary

    s = summarize([record(0.0, [0.1, 0.2, 0.4], tokens=3)], duration=1.0, slo=SLO(ttft_ms=500))
    assert Summary.from_dict({**s.to_dict(), "extra": 1}) == s
