"""Prometheus configuration and alert rules, checked by promtool itself."""

from __future__ import annotations

from pathlib import Path

from tests.deploy.deploy_support import ALERTS, DEPLOY, PROMETHEUS_CONFIG, require_tool, run_tool


def promtool(*args: str) -> None:
    exe = require_tool("promtool")
    proc = run_tool([exe, *args])
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}{proc.stderr}"


def test_config_is_valid() -> None:
    # Also loads and checks every rule file the config names.
    promtool("check", "config", str(PROMETHEUS_CONFIG))


def test_alert_rules_are_valid() -> None:
    promtool("check", "rules", str(ALERTS))


def test_alert_rules_fire_as_specified() -> None:
    promtool("test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yml"))


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "prometheus.yml"
    text = PROMETHEUS_CONFIG.read_text().replace("scrape_interval: 5s", "scrape_interval: often")
    broken.write_text(text.replace("- alerts.yml", f"- {ALERTS}"))
    exe = require_tool("promtool")
    proc = run_tool([exe, "check", "config", str(broken)])
    assert proc.returncode != 0 and "often" in proc.stdout + proc.stderr
