"""docker-compose.yml and its CPU override: valid Compose files, merged the way Compose merges."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deploy_support import (
    DEPLOY,
    PROMETHEUS_CONFIG,
    REPO,
    Override,
    Reset,
    assert_valid_settings_env,
    load_yaml,
    parse_duration,
    require_tool,
    run_tool,
)

BASE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"
SCHEMA = DEPLOY / "schema" / "compose-spec.json"

# Sequences that an override replaces instead of extending (Compose merge rules).
REPLACED_SEQUENCES = {"command", "entrypoint", "test"}
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$`, applied to every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.groups()
        current = env.get(name)
        if op in (":-", ":?") and not current or op in ("-", "?") and current is None:
            if op.endswith("?"):
                raise ValueError(f"required variable {name} is unset: {default}")
            return default
        return current or ""

    return _VARIABLE.sub(replace, value)


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Merge an override file into a base file as Compose does."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            if isinstance(value, Reset):
                merged.pop(name, None)
            elif name in merged:
                merged[name] = merge(merged[name], value, name)
            else:
                merged[name] = value.value if isinstance(value, Override) else value
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + [item for item in override if item not in base]
    return override


def test_merge_follows_compose_rules() -> None:
    base = {"a": {"x": 1, "keep": [1]}, "env": {"A": "1"}, "command": ["x"], "r": {"y": 2}}
    override = {
        "a": {"x": 2, "keep": [1, 2]},
        "env": {"B": "2"},
        "command": ["y"],
        "r": Reset(),
    }
    merged = merge(base, override)
    assert merged == {"a": {"x": 2, "keep": [1, 2]}, "env": {"A": "1", "B": "2"}, "command": ["y"]}
    assert merge({"a": {"x": 1}}, {"a": Override({"y": 2})}) == {"a": {"y": 2}}


def test_interpolation() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d}/${UNSET:-d}/${EMPTY:-d}/${EMPTY-d}/$$x", env) == "v/d/d//$x"


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return interpolate(load_yaml(BASE), {})


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return interpolate(merge(load_yaml(BASE), load_yaml(CPU_OVERRIDE)), {})


def validate(document: dict[str, Any], tmp_path: Path, name: str) -> None:
    exe = require_tool("check-jsonschema")
    target = tmp_path / f"{name}.json"
    target.write_text(json.dumps(document))
    proc = run_tool([exe, "--schemafile", str(SCHEMA), str(target)])
    assert proc.returncode == 0, (
        f"{name} does not follow the Compose spec:\n{proc.stdout}{proc.stderr}"
    )


def test_schema_is_the_compose_spec() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"
    assert "service" in schema["$defs"]


def test_base_file_validates(base: dict[str, Any], tmp_path: Path) -> None:
    validate(base, tmp_path, "docker-compose")


def test_cpu_override_merged_validates(cpu: dict[str, Any], tmp_path: Path) -> None:
    validate(cpu, tmp_path, "docker-compose+cpu")


def test_schema_rejects_a_broken_file(base: dict[str, Any], tmp_path: Path) -> None:
    # The validator itself must be able to fail: an unknown service key is an error.
    broken = json.loads(json.dumps(base))
    broken["services"]["gptserve"]["stop_grace_periods"] = "45s"
    with pytest.raises(AssertionError, match="stop_grace_periods"):
        validate(broken, tmp_path, "broken")


def test_gpu_reservation_in_base_only(base: dict[str, Any], cpu: dict[str, Any]) -> None:
    devices = base["services"]["gptserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert base["services"]["gptserve"]["build"]["args"]["VARIANT"] == "cuda"
    service = cpu["services"]["gptserve"]
    assert "reservations" not in service["deploy"]["resources"]
    assert service["build"]["args"]["VARIANT"] == "cpu"
    assert service["environment"]["GPTSERVE_DEVICE"] == "cpu"


@pytest.mark.parametrize("variant", ["base", "cpu"])
def test_gptserve_service(variant: str, request: pytest.FixtureRequest, monkeypatch) -> None:
    service = request.getfixturevalue(variant)["services"]["gptserve"]
    env = service["environment"]
    # Unset values are passed through from the shell only when set there.
    assert_valid_settings_env({k: v for k, v in env.items() if v is not None}, monkeypatch)
    drain = float(env["GPTSERVE_DRAIN_TIMEOUT"])
    assert parse_duration(service["stop_grace_period"]) > drain + 5
    assert service["stop_signal"] == "SIGTERM"
    assert any("/ready" in part for part in service["healthcheck"]["test"])
    assert service["ports"] == ["8000:8000"]


def test_prometheus_and_grafana_mounts_exist(base: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in base["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_prometheus_scrapes_the_compose_service(base: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "gptserve")
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    container_port = base["services"]["gptserve"]["ports"][0].split(":")[-1]
    assert targets == [f"gptserve:{container_port}"]
    assert "gptserve" in base["services"]


@pytest.mark.parametrize(
    "env",
    [{"GPTSERVE_KV_CACHE_FRACTION": "0.8"}, {"GPTSERVE_DTYPE": "bf16"}, {"GPTSERVE_API_KEY": ""}],
)
def test_settings_check_catches_mistakes(env: dict[str, str], monkeypatch) -> None:
    # A misspelt variable is silently ignored by the server: this check must catch it.
    with pytest.raises(Exception, match="not server settings|validation error"):
        assert_valid_settings_env(env, monkeypatch)


def test_third_party_images_are_pinned(base: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        image = base["services"][name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), (
            f"{name}: pin a version, got {image}"
        )
