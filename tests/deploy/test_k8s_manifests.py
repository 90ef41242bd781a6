"""Kubernetes manifests: schema-valid, renderable, and consistent with the server's contract."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_support import (
    K8S,
    REPO,
    assert_valid_settings_env,
    find_tool,
    load_yaml,
    load_yaml_documents,
    require_tool,
    run_tool,
)

# The oldest and a recent minor version that kubernetes-validate bundles schemas for.
KUBERNETES_VERSIONS = ["1.29", "1.34"]
OPTIONAL = {"podmonitor.yaml"}  # needs the Prometheus Operator CRD


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, Any]]:
    """kind -> resource, from the files the kustomization lists."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    by_kind = {}
    for name in kustomization["resources"]:
        for doc in load_yaml_documents(K8S / name):
            by_kind[doc["kind"]] = doc
    return by_kind


@pytest.fixture(scope="module")
def container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = resources["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one server process per pod"
    return containers[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_validate_strict(version: str) -> None:
    exe = require_tool("kubernetes-validate")
    files = [str(p) for p in manifests()]
    proc = run_tool([exe, "--strict", "--kubernetes-version", version, *files])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # A resource without a bundled schema only warns: make sure each core one was checked.
    for path in manifests():
        if path.name not in OPTIONAL:
            assert f"{path.relative_to(REPO)} passed" in output or f"{path} passed" in output, (
                output
            )


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    exe = require_tool("kubernetes-validate")
    broken = tmp_path / "deployment.yaml"
    text = (K8S / "deployment.yaml").read_text()
    broken.write_text(
        text.replace(
            "imagePullPolicy: IfNotPresent", "imagePullPolicy: IfNotPresent\n          gpus: 1"
        )
    )
    proc = run_tool([exe, "--strict", "--kubernetes-version", KUBERNETES_VERSIONS[0], str(broken)])
    assert proc.returncode != 0 and "gpus" in proc.stdout + proc.stderr


def test_kustomization_renders() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in manifests()} - OPTIONAL
    kubectl = find_tool("kubectl")
    if kubectl is None:
        # Without kubectl, at least every listed file parses as a resource.
        for name in listed:
            assert all(doc.get("kind") for doc in load_yaml_documents(K8S / name)), name
        return
    proc = run_tool([kubectl, "kustomize", str(K8S)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(proc.stdout))
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    )


def test_configmap_holds_valid_settings(resources: dict[str, dict[str, Any]], monkeypatch) -> None:
    assert_valid_settings_env(resources["ConfigMap"]["data"], monkeypatch)


def test_probes_and_ports(container: dict[str, Any]) -> None:
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["args"] == ["--host", "0.0.0.0", "--port", "8000"]
    for probe, path in (
        ("startupProbe", "/ready"),
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/health"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    # Loading and warming the model may take minutes: the startup probe must allow it.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180


def test_gpu_resources(container: dict[str, Any]) -> None:
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["requests"])


def test_graceful_shutdown_fits_in_the_grace_period(
    resources: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    drain = float(resources["ConfigMap"]["data"]["GPTSERVE_DRAIN_TIMEOUT"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = resources["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain + pre_stop + 5, (grace, drain, pre_stop)


def test_runs_as_the_image_user(
    resources: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    pod = resources["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    image_user = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.M)
    assert image_user is not None
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == int(image_user.group(1))
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["readOnlyRootFilesystem"] is True
    # The image puts its caches under /tmp: it must be writable.
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_settings_come_from_the_configmap(
    resources: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    assert container["envFrom"] == [
        {"configMapRef": {"name": resources["ConfigMap"]["metadata"]["name"]}}
    ]


def test_selectors_match(resources: dict[str, dict[str, Any]]) -> None:
    deployment = resources["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Deployment", "PodDisruptionBudget"):
        selector = resources[kind]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), kind
    assert resources["Service"]["spec"]["selector"].items() <= labels.items()
    assert resources["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    monitor = load_yaml(K8S / "podmonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"


def test_scrape_annotations(
    resources: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    annotations = resources["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]


def test_autoscaler(resources: dict[str, dict[str, Any]]) -> None:
    hpa = resources["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == resources["Deployment"]["metadata"]["name"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "gptserve_requests_waiting"
    # The HPA owns the replica count; a `replicas` field would fight it on every apply.
    assert "replicas" not in resources["Deployment"]["spec"]
