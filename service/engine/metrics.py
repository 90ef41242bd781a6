"""Prometheus metrics of one engine, recorded by the engine where the facts are."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 1 ms to 10 minutes: a decode step on an H200 is a few ms, a long CPU request minutes.
TIME_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class EngineMetrics:
    """Every metric carries the ``model_name`` label; ``labels`` are bound once."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        m = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, m, registry=registry)

        def counter(name: str, doc: str, extra: list[str] | None = None) -> Counter:
            return Counter(name, doc, m + (extra or []), registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = TIME_BUCKETS) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=registry)

        self.model_name = model_name
        self._running = gauge("gptserve_requests_running", "Requests in the running batch.")
        self._waiting = gauge("gptserve_requests_waiting", "Requests waiting to be scheduled.")
        self._kv = gauge(
            "gptserve_kv_cache_usage_ratio", "Share of KV cache blocks held by requests."
        )
        self._prompt = counter("gptserve_prompt_tokens", "Prompt tokens of admitted requests.")
        self._gen = counter("gptserve_generation_tokens", "Generated tokens.")
        self._success = counter(
            "gptserve_request_success", "Finished requests by finish reason.", ["finished_reason"]
        )
        self._pq = counter(
            "gptserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self._ph = counter("gptserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self._preempt = counter(
            "gptserve_preemptions", "Sequences preempted for lack of KV blocks."
        )
        self._ttft = histogram("gptserve_time_to_first_token_seconds", "Arrival to first token.")
        self._itl = histogram("gptserve_inter_token_latency_seconds", "Time between two tokens.")
        self._e2e = histogram("gptserve_e2e_request_latency_seconds", "Arrival to finish.")
        self._queue = histogram(
            "gptserve_request_queue_time_seconds", "Arrival to first scheduled."
        )
        self._prefill = histogram(
            "gptserve_request_prefill_time_seconds", "First scheduled to first token."
        )
        self._decode = histogram("gptserve_request_decode_time_seconds", "First token to finish.")
        self._iter = histogram(
            "gptserve_iteration_tokens", "Tokens computed per engine step.", TOKEN_BUCKETS
        )
        # Bound children: no label lookup on the hot path.
        self.running = self._running.labels(model_name)
        self.waiting = self._waiting.labels(model_name)
        self.kv_cache_usage = self._kv.labels(model_name)
        self.prompt_tokens = self._prompt.labels(model_name)
        self.generation_tokens = self._gen.labels(model_name)
        self.prefix_queries = self._pq.labels(model_name)
        self.prefix_hits = self._ph.labels(model_name)
        self.preemptions = self._preempt.labels(model_name)
        self.ttft = self._ttft.labels(model_name)
        self.itl = self._itl.labels(model_name)
        self.e2e = self._e2e.labels(model_name)
        self.queue_time = self._queue.labels(model_name)
        self.prefill_time = self._prefill.labels(model_name)
        self.decode_time = self._decode.labels(model_name)
        self.iteration_tokens = self._iter.labels(model_name)

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()
