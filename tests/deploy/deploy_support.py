"""Helpers shared by the deployment checks: paths, external tools, YAML, PromQL names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gptserve.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

INSTALL_HINT = (
    "`bash .ci/install-tools.sh` installs prometheus and promtool, "
    "`make venv` the Python tools (the `deploy-check` extra)"
)


def find_tool(name: str) -> str | None:
    """The executable, preferring the one installed next to this Python (the virtualenv)."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def require_tool(name: str) -> str:
    """Path of a tool the checks need: a missing tool skips locally but fails under CI."""
    path = find_tool(name)
    if path is not None:
        return path
    message = f"`{name}` is not installed; {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (required under CI)")
    pytest.skip(message)


def run_tool(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO)


# -- YAML with the Compose merge tags -------------------------------------------------


class Reset:
    """`!reset`: the override removes the key from the merged file."""


class Override:
    """`!override`: the override replaces the base value instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """Safe YAML loader that understands the two tags Compose defines for overrides."""


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _construct_reset)
ComposeLoader.add_constructor("!override", _construct_override)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.load(f, Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


# -- PromQL ---------------------------------------------------------------------------

# Words of the language that look like metric names.
_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_DURATION = re.compile(r"\[[^\]]*\]")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, PromQL) of every panel target, plus the selector of each `label_values` variable."""
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard["templating"]["list"]:
        definition = variable["definition"]
        if not (definition.startswith("label_values(") and definition.endswith(")")):
            raise ValueError(f"variable {variable['name']}: not label_values(...): {definition}")
        selector = definition.removeprefix("label_values(")[:-1].rsplit(",", 1)[0]
        queries.append((f"variable {variable['name']}", selector))
    return queries


def substitute_grafana_variables(expr: str) -> str:
    """Replace Grafana's template variables so the expression is plain PromQL."""
    expr = re.sub(r"\$__(rate_)?interval|\$__range", "1m", expr)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects (not functions, labels, keywords or numbers).

    Label matchers `{...}` and grouping lists `by (...)` are cut out first; what is
    left that is an identifier not followed by `(` names a metric.
    """
    text = _STRING.sub('""', expr)
    text = _DURATION.sub("", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if word.lower() in _PROMQL_KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def base_metric_name(series: str, histograms: set[str]) -> str:
    """`x_bucket` -> `x` when `x` is an exported histogram (Prometheus appends the suffix)."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in histograms:
            return series.removesuffix(suffix)
    return series


# -- server settings ------------------------------------------------------------------


def assert_valid_settings_env(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every GPTSERVE_* variable names a server setting and its value is accepted."""
    from service.settings import Settings

    fields = {f"GPTSERVE_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(set(env) - fields)
    assert not unknown, f"not server settings: {unknown}"
    for name in fields:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    Settings()  # raises pydantic.ValidationError naming the bad variable


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration such as `1m30s` (Compose, Prometheus)."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


# -- live server ----------------------------------------------------------------------


def complete(base_url: str, count: int, max_tokens: int = 8) -> None:
    """Send `count` completion requests (alternately plain and streamed) and check they succeed."""
    with httpx.Client(base_url=base_url, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for i in range(count):
            body = {"model": model, "prompt": f"Count to {i + 3}:", "max_tokens": max_tokens}
            if i % 2:
                with client.stream(
                    "POST", "/v1/completions", json={**body, "stream": True}
                ) as response:
                    assert response.status_code == 200, response.read()
                    events = [line for line in response.iter_lines() if line.startswith("data:")]
                assert events[-1] == "data: [DONE]"
            else:
                response = client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
