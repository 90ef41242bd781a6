"""Every metric the dashboard, the alerts and the autoscaler query is one a running server exports."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.deploy_support import (
    ALERTS,
    DASHBOARD,
    K8S,
    base_metric_name,
    complete,
    dashboard_queries,
    load_yaml,
    metric_names,
    substitute_grafana_variables,
)

# Series Prometheus makes itself rather than scraping them.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(server: str) -> tuple[set[str], set[str]]:
    """(sample names, histogram names) of the live /metrics after a few requests.

    Labelled series such as `..._request_success_total{finished_reason}` appear only
    once a request has finished, hence the requests first.
    """
    complete(server, 2)
    text = httpx.get(f"{server}/metrics", timeout=10).text
    samples, histograms = set(), set()
    for family in text_string_to_metric_families(text):
        samples |= {sample.name for sample in family.samples}
        if family.type == "histogram":
            histograms.add(family.name)
    return samples, histograms


def alert_queries() -> list[tuple[str, str]]:
    groups = load_yaml(ALERTS)["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def unknown_names(expr: str, exported: tuple[set[str], set[str]]) -> set[str]:
    samples, histograms = exported
    names = metric_names(substitute_grafana_variables(expr))
    assert names, f"no metric found in {expr!r}"
    missing = set()
    for name in names - SYNTHETIC:
        base = base_metric_name(name, histograms)
        # `_bucket` only exists on histograms: map it back to the histogram's name.
        if name not in samples or (name.endswith("_bucket") and base not in histograms):
            missing.add(name)
    return missing


def test_dashboard_names_exported_metrics(exported: tuple[set[str], set[str]]) -> None:
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) > 10
    missing = {title: sorted(unknown_names(expr, exported)) for title, expr in queries}
    assert not {t: m for t, m in missing.items() if m}, f"not exported by gptserve: {missing}"


def test_alerts_name_exported_metrics(exported: tuple[set[str], set[str]]) -> None:
    missing = {alert: sorted(unknown_names(expr, exported)) for alert, expr in alert_queries()}
    assert not {a: m for a, m in missing.items() if m}, f"not exported by gptserve: {missing}"


def test_autoscaler_metric_is_exported(exported: tuple[set[str], set[str]]) -> None:
    hpa = load_yaml(K8S / "hpa.yaml")
    for metric in hpa["spec"]["metrics"]:
        assert metric["pods"]["metric"]["name"] in exported[0]


def test_check_catches_a_wrong_name(exported: tuple[set[str], set[str]]) -> None:
    assert unknown_names("sum(rate(gptserve_generated_tokens_total[1m]))", exported) == {
        "gptserve_generated_tokens_total"
    }
    assert unknown_names("gptserve_requests_running_bucket", exported) == {
        "gptserve_requests_running_bucket"
    }
