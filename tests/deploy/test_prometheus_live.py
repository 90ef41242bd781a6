"""A real Prometheus scrapes a real gptserve and computes a latency quantile from it."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.deploy_support import complete, require_tool
from tests.integration.live_server import free_port

pytestmark = pytest.mark.slow

TTFT_P50 = (
    "histogram_quantile(0.5, sum by (le) (rate(gptserve_time_to_first_token_seconds_bucket[1m])))"
)
WAIT_S = 55.0  # every wait below shares this bound


class Prometheus:
    def __init__(self, url: str, deadline: float) -> None:
        self.url = url
        self.deadline = deadline

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def poll(self, what: str, check: Any) -> Any:
        """Call `check` until it returns something truthy, or fail at the deadline."""
        last: Any = None
        while time.monotonic() < self.deadline:
            try:
                last = check()
            except httpx.TransportError as exc:
                last = exc
            except httpx.HTTPStatusError as exc:  # 503 while its storage starts: not up yet
                if exc.response.status_code != 503:
                    raise
                last = exc
            else:
                if last:
                    return last
            time.sleep(0.5)
        pytest.fail(f"timed out waiting for {what}; last answer: {last!r}")


@pytest.fixture
def prometheus(server: str, tmp_path: Path) -> Iterator[Prometheus]:
    exe = require_tool("prometheus")
    target = server.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "gptserve", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        exe,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Prometheus(f"http://127.0.0.1:{port}", time.monotonic() + WAIT_S)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.returncode not in (0, -15):
            print(log.read_text()[-4000:])


def finite_value(result: list[dict[str, Any]]) -> float | None:
    values = [float(series["value"][1]) for series in result]
    return values[0] if values and all(math.isfinite(v) for v in values) else None


def test_prometheus_computes_ttft_quantile(server: str, prometheus: Prometheus) -> None:
    def target_up() -> bool:
        return any(series["value"][1] == "1" for series in prometheus.query('up{job="gptserve"}'))

    prometheus.poll("Prometheus to scrape gptserve", target_up)
    # After the first scrape: rate() needs the counts to grow between two scrapes.
    complete(server, 4)
    p50 = prometheus.poll("a finite TTFT p50", lambda: finite_value(prometheus.query(TTFT_P50)))
    assert 0 < p50 < 120
    tokens = prometheus.query("sum(gptserve_generation_tokens_total)")
    assert float(tokens[0]["value"][1]) >= 4
