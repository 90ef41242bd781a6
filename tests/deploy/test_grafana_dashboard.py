"""The Grafana dashboard and its provisioning: well-formed, complete, valid PromQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_support import (
    DASHBOARD,
    DEPLOY,
    REPO,
    dashboard_queries,
    load_yaml,
    metric_names,
    require_tool,
    run_tool,
    substitute_grafana_variables,
)

PROVISIONING = DEPLOY / "grafana" / "provisioning"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_expressions(dashboard: dict[str, Any]) -> list[str]:
    return [expr for _, expr in dashboard_queries(dashboard)]


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, instance) (rate(a_seconds_bucket{x=~"$y", z="w"}'
        "[$__rate_interval]))) / ignoring(le) sum(rate(b_total[5m])) > bool 0 and on (i) up"
    )
    assert metric_names(substitute_grafana_variables(expr)) == {"a_seconds_bucket", "b_total", "up"}
    assert metric_names('sum(c) by (instance) + count_over_time(d{e="f"}[1m])') == {"c", "d"}


def test_datasource_is_the_provisioned_one(dashboard: dict[str, Any]) -> None:
    provisioned = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    uid = provisioned[0]["uid"]
    assert provisioned[0]["url"] == "http://prometheus:9090"  # the compose service
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid


def test_provider_path_is_where_compose_mounts_the_dashboards() -> None:
    provider = load_yaml(PROVISIONING / "dashboards" / "gptserve.yml")["providers"][0]
    compose = load_yaml(REPO / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]


@pytest.mark.parametrize(
    "histogram",
    [
        "gptserve_time_to_first_token_seconds",
        "gptserve_inter_token_latency_seconds",
        "gptserve_e2e_request_latency_seconds",
    ],
)
def test_latency_quantiles(dashboard: dict[str, Any], histogram: str) -> None:
    exprs = [e for e in all_expressions(dashboard) if f"{histogram}_bucket" in e]
    quantiles = {
        e.split("(", 1)[1].split(",", 1)[0] for e in exprs if e.startswith("histogram_quantile(")
    }
    assert {"0.5", "0.95", "0.99"} <= quantiles, exprs


@pytest.mark.parametrize(
    "needle",
    [
        "rate(gptserve_generation_tokens_total",
        "gptserve_requests_running",
        "gptserve_requests_waiting",
        "gptserve_kv_cache_usage_ratio",
        "gptserve_prefix_cache_hits_total",
        "sum by (status) (rate(gptserve_http_requests_total",
    ],
)
def test_required_panels(dashboard: dict[str, Any], needle: str) -> None:
    assert any(needle in e for e in all_expressions(dashboard)), needle


def test_expressions_parse(dashboard: dict[str, Any], tmp_path: Path) -> None:
    # promtool parses PromQL when it checks rules: turn each query into a recording rule.
    exprs = all_expressions(dashboard)
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute_grafana_variables(e)}
        for i, e in enumerate(exprs)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    exe = require_tool("promtool")
    proc = run_tool([exe, "check", "rules", str(path)])
    assert proc.returncode == 0, f"invalid PromQL in the dashboard:\n{proc.stdout}{proc.stderr}"
