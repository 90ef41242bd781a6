"""Prometheus metrics of one engine, recorded by the engine where the facts are."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 1 ms to 10 minutes: a decode step on an H200 is a few ms, a long CPU request minutes.
TIME_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# 0.1 ms to 10 s: a JSON schema compiles in about a millisecond, the timeout is seconds.
COMPILE_BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class EngineMetrics:
    """Every metric carries the ``model_name`` label, bound once: no label lookup on
    the hot path."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        m = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, m, registry=registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, m, registry=registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = TIME_BUCKETS) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=registry).labels(model_name)

        self.model_name = model_name
        self.running = gauge("gptserve_requests_running", "Requests in the running batch.")
        self.waiting = gauge("gptserve_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge(
            "gptserve_kv_cache_usage_ratio", "Share of KV cache blocks held by requests."
        )
        self.prompt_tokens = counter(
            "gptserve_prompt_tokens", "Prompt tokens of admitted requests."
        )
        self.generation_tokens = counter("gptserve_generation_tokens", "Generated tokens.")
        # The one metric with a second label, bound per finish reason when it happens.
        self._success = Counter(
            "gptserve_request_success",
            "Finished requests by finish reason.",
            m + ["finished_reason"],
            registry=registry,
        )
        self.prefix_queries = counter(
            "gptserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter(
            "gptserve_prefix_cache_hits", "Prompt tokens found in the prefix cache."
        )
        self.preemptions = counter(
            "gptserve_preemptions", "Sequences preempted for lack of KV blocks."
        )
        self.ttft = histogram("gptserve_time_to_first_token_seconds", "Arrival to first token.")
        self.itl = histogram("gptserve_inter_token_latency_seconds", "Time between two tokens.")
        self.e2e = histogram("gptserve_e2e_request_latency_seconds", "Arrival to finish.")
        self.queue_time = histogram(
            "gptserve_request_queue_time_seconds", "Arrival to first scheduled."
        )
        self.prefill_time = histogram(
            "gptserve_request_prefill_time_seconds", "First scheduled to first token."
        )
        self.decode_time = histogram(
            "gptserve_request_decode_time_seconds", "First token to finish."
        )
        self.iteration_tokens = histogram(
            "gptserve_iteration_tokens", "Tokens computed per engine step.", TOKEN_BUCKETS
        )
        self.constrained_requests = Counter(
            "gptserve_constrained_requests",
            "Requests with an output constraint, by kind (json_schema, regex, ...).",
            m + ["kind"],
            registry=registry,
        )
        self.constraint_cache_hits = counter(
            "gptserve_constraint_cache_hits",
            "Constrained requests whose grammar was already compiled (or compiling).",
        )
        self.compile_time = histogram(
            "gptserve_constraint_compile_seconds",
            "Time to compile one distinct constraint into a grammar.",
            COMPILE_BUCKETS,
        )

    def constrained(self, kind: str, cache_hit: bool) -> None:
        self.constrained_requests.labels(self.model_name, kind).inc()
        if cache_hit:
            self.constraint_cache_hits.inc()

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()
