"""The load generator end to end against a stub OpenAI-style SSE server."""

import math

import pytest

from bench.loadgen import LoadSpec, Prompt, arrival_offsets, run
from bench.metrics import summarize
from bench.sweep import SweepSpec, run_sweep


def prompts(n: int) -> list[Prompt]:
    return [Prompt(prompt=[1, 2, 3, 4], num_tokens=4) for _ in range(n)]


def test_closed_loop_run_measures_every_request(stub_server):
    url, state = stub_server
    spec = LoadSpec(url, "stub", prompts(6), output_len=8, max_concurrency=3, progress=False)
    result = run(spec)
    assert len(result.records) == 6
    assert all(r.ok for r in result.records), [r.error for r in result.records]
    for r in result.records:
        assert len(r.chunk_times) == 8 and r.output_tokens == 8 and r.prompt_tokens == 4
        assert r.text.startswith("t0 t1 ")
        assert r.ttft >= 0.004  # the stub waits 5 ms before the first token
        assert all(g > 0 for g in r.itl)
    assert state.max_in_flight <= 3
    body = state.bodies[0]
    assert body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.0 and body["max_tokens"] == 8
    s = summarize(result.records, result.duration_s)
    assert s.completed == 6 and s.total_output_tokens == 48
    assert s.tpot_ms.median == pytest.approx(5.0, abs=4.0)


def test_http_errors_are_recorded_as_failures(stub_server):
    url, _ = stub_server
    spec = LoadSpec(url, "stub", prompts(2), output_len=2000, progress=False)
    result = run(spec)
    assert [r.ok for r in result.records] == [False, False]
    assert result.records[0].error.startswith("HTTP 400")


def test_unreachable_server_is_a_failure_not_a_crash():
    spec = LoadSpec(
        "http://127.0.0.1:9", "stub", prompts(1), output_len=2, progress=False, timeout_s=5
    )
    result = run(spec)
    assert not result.records[0].ok and result.records[0].error


def test_poisson_schedule_has_the_offered_rate_and_is_seeded():
    times = arrival_offsets(200, rate=4.0, burstiness=1.0, seed=1)
    assert times[-1] == pytest.approx(50.0)
    assert times == sorted(times)
    assert arrival_offsets(200, 4.0, 1.0, seed=1) == times
    assert arrival_offsets(200, 4.0, 1.0, seed=2) != times
    assert arrival_offsets(3, math.inf) == [0.0, 0.0, 0.0]


def test_low_burstiness_gives_more_variable_gaps():
    def cv(b: float) -> float:
        t = [0.0, *arrival_offsets(2000, 10.0, b, seed=0)]
        gaps = [y - x for x, y in zip(t, t[1:])]
        mean = sum(gaps) / len(gaps)
        return (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean

    assert cv(1.0) == pytest.approx(1.0, abs=0.1)  # exponential gaps
    assert cv(0.25) > 1.6  # gamma shape 1/4: coefficient of variation 2


def test_rate_sweep_spreads_requests_over_time(stub_server):
    url, _ = stub_server
    spec = SweepSpec(
        url,
        "stub",
        prompts(20),
        output_len=3,
        mode="rate",
        levels=[20.0],
        requests_per_level=10,
        warmup=0,
        progress=False,
    )
    (point,) = run_sweep(spec)
    assert point.summary.completed == 10
    assert point.summary.duration_s >= 0.4  # the last arrival is at 10/20 s


def test_concurrency_sweep_reports_each_level(stub_server):
    url, state = stub_server
    spec = SweepSpec(url, "stub", prompts(10), output_len=4, levels=[1, 4], progress=False)
    points = run_sweep(spec)
    assert [p.level for p in points] == [1.0, 4.0]
    assert [p.summary.completed for p in points] == [4, 8]
    assert len(state.bodies) == 1 + 4 + 8  # the warmup request, then each level
    assert len(points[1].ttft_ms) == 8


def test_health_probe_runs_while_requests_are_in_flight_then_cancels_them(stub_server):
    import asyncio

    from bench.server_bench import health_during_prefill, max_model_len

    url, state = stub_server
    assert max_model_len(url, "stub") == 512
    state.delay_s = 0.05  # 100 tokens: 5 s per request, far longer than the window
    spec = LoadSpec(url, "stub", prompts(3), output_len=100, progress=False)
    probe = asyncio.run(health_during_prefill(spec, spec.prompts, window_s=0.5, interval=0.05))
    assert 5 <= len(probe.latencies_ms) <= 12 and probe.failures == 0
    assert probe.finished == 0  # none finished inside the window
    assert probe.window_s < 2.0  # the unfinished requests were cancelled, not awaited
    assert state.max_in_flight == 3
