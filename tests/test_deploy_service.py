"""Checks that the deployment files agree with the service they deploy.

The Dockerfile's commands must be ones the CLI accepts, the Deployment's
environment variables must be settings the service reads, and every probe path,
metric name and label the manifests and rules rely on must be served by a real
fxserve. The last group uses the `live_server` fixture from tests/conftest.py,
which runs the server on 127.0.0.1 with a small test config.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .deployfiles import K8S_DIR, REPO_ROOT, dockerfile_instructions, render_overlays

RULES_FILE = K8S_DIR / "monitoring" / "fxserve.rules.yaml"
ADAPTER_VALUES = K8S_DIR / "examples" / "prometheus-adapter-values.yaml"

PROBE_KINDS = ("startupProbe", "readinessProbe", "livenessProbe")

# A metric name in PromQL: `fxserve_` then word characters. Recording rule
# names contain colons, so they never match.
METRIC_NAME = re.compile(r"\bfxserve_[a-z0-9_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")

HTTP_TIMEOUT_S = 30.0


# --- helpers --------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return render_overlays()


def fxserve_containers(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    containers = []
    for objects in rendered.values():
        for obj in objects:
            if obj["kind"] == "Deployment":
                containers.extend(c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == "fxserve")
    assert containers, "no fxserve container rendered"
    return containers


def dockerfile_lines() -> list[str]:
    """Return the Dockerfile's instructions as single lines, continued lines joined."""
    return [f"{keyword} {arguments}" for keyword, arguments in dockerfile_instructions()]


def dockerfile_cmd() -> list[str]:
    commands = [line.partition(" ")[2] for line in dockerfile_lines() if line.upper().startswith("CMD ")]
    assert len(commands) == 1, f"expected one CMD, found {len(commands)}"
    return json.loads(commands[0])


def dockerfile_healthcheck_path() -> str:
    healthchecks = [line for line in dockerfile_lines() if line.upper().startswith("HEALTHCHECK ")]
    assert len(healthchecks) == 1, f"expected one HEALTHCHECK, found {len(healthchecks)}"
    match = re.search(r"http://127\.0\.0\.1:\d+(/[\w/]*)", healthchecks[0])
    assert match, f"HEALTHCHECK has no local URL: {healthchecks[0]}"
    return match.group(1)


def cli_help(*subcommand: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "service", *subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, f"`python -m service {' '.join(subcommand)} --help` failed:\n{result.stderr}"
    return result.stdout


def metric_names_used(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, set[str]]:
    """Collect each place that names a service metric, with the names it uses."""
    used: dict[str, set[str]] = {}
    for overlay, objects in rendered.items():
        for obj in objects:
            if obj["kind"] == "HorizontalPodAutoscaler":
                names = {metric["pods"]["metric"]["name"] for metric in obj["spec"]["metrics"] if metric["type"] == "Pods"}
                used[f"HPA in overlay {overlay}"] = names
            if obj["kind"] == "ScaledObject":
                queries = " ".join(trigger["metadata"]["query"] for trigger in obj["spec"]["triggers"])
                used[f"ScaledObject in overlay {overlay}"] = set(METRIC_NAME.findall(queries))

    adapter_rules = yaml.safe_load(ADAPTER_VALUES.read_text(encoding="utf-8"))["rules"]["custom"]
    used[ADAPTER_VALUES.name] = set(METRIC_NAME.findall(" ".join(rule["seriesQuery"] for rule in adapter_rules)))

    groups = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]
    expressions = " ".join(rule["expr"] for group in groups for rule in group["rules"])
    used[RULES_FILE.name] = set(METRIC_NAME.findall(expressions))
    return used


def scrape(base_url: str) -> dict[str, Any]:
    """Fetch /metrics and return its metric families by name."""
    response = httpx.get(f"{base_url}/metrics", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def exported_names(families: dict[str, Any]) -> set[str]:
    """Return every series name a scrape can contain, samples or not yet."""
    names = set(families)
    for name, family in families.items():
        if family.type == "histogram":
            names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        if family.type == "counter":
            names.add(name + "_total")
        names.update(sample.name for sample in family.samples)
    return names


# --- the image and the manifests against the code ---------------------------


def test_dockerfile_cmd_options_exist() -> None:
    command = dockerfile_cmd()
    module_index = command.index("-m")
    assert command[module_index + 1] == "service"
    subcommand = command[module_index + 2]
    help_text = cli_help(subcommand)
    for option in (token for token in command if token.startswith("--")):
        assert option in help_text, f"`{subcommand}` has no option {option}"


def test_dockerfile_prefetch_options_exist() -> None:
    prefetch_lines = [line for line in dockerfile_lines() if "-m service prefetch" in line]
    assert len(prefetch_lines) == 1
    options = re.findall(r"\s(--[a-z-]+)", prefetch_lines[0].partition("prefetch")[2])
    help_text = cli_help("prefetch")
    for option in options:
        assert option in help_text, f"`prefetch` has no option {option}"


def test_deployment_env_names_are_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from service.settings import Settings

    known = {f"FXSERVE_{spec.name.upper()}" for spec in fields(Settings)}
    for container in fxserve_containers(rendered):
        for item in container.get("env", []):
            if item["name"].startswith("FXSERVE_"):
                assert item["name"] in known, f"{item['name']} is not a setting the service reads"


def test_deployment_env_values_parse(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from service.settings import Settings

    for container in fxserve_containers(rendered):
        environ = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
        Settings.from_env(environ)


def test_configmap_models_yaml_loads() -> None:
    from service.config import load_config

    config = load_config(K8S_DIR / "base" / "models.yaml")
    assert config.models


# --- against a running server ---------------------------------------------


def test_probe_paths_are_served(live_server: Any, rendered: dict[str, list[dict[str, Any]]]) -> None:
    paths = {dockerfile_healthcheck_path()}
    for container in fxserve_containers(rendered):
        for probe_kind in PROBE_KINDS:
            paths.add(container[probe_kind]["httpGet"]["path"])

    for path in sorted(paths):
        response = httpx.get(f"{live_server.base_url}{path}", timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200, f"GET {path} returned {response.status_code} on a ready server"


def test_manifest_metrics_are_exported(live_server: Any, rendered: dict[str, list[dict[str, Any]]]) -> None:
    exported = exported_names(scrape(live_server.base_url))
    for place, names in metric_names_used(rendered).items():
        assert names, f"{place} names no fxserve metric"
        missing = names - exported
        assert not missing, f"{place} uses {sorted(missing)}, which /metrics does not export"


def test_queue_depth_reported_per_model(live_server: Any) -> None:
    # The HPA and KEDA read this gauge. A pod that reports no sample for it
    # (no request yet) leaves the autoscaler without a value for that pod.
    readiness = httpx.get(f"{live_server.base_url}/readyz", timeout=HTTP_TIMEOUT_S).json()
    families = scrape(live_server.base_url)
    assert "fxserve_queue_depth" in families
    reported = {sample.labels.get("model") for sample in families["fxserve_queue_depth"].samples}
    for model in readiness["models"]:
        assert model in reported, f"fxserve_queue_depth has no sample for model {model!r}"


def test_duration_histogram_has_endpoint_label(live_server: Any) -> None:
    # The p99 rule groups by `endpoint`. Requesting /healthz creates a series.
    httpx.get(f"{live_server.base_url}/healthz", timeout=HTTP_TIMEOUT_S)
    families = scrape(live_server.base_url)
    assert families["fxserve_request_duration_seconds"].type == "histogram"
    buckets = [s for s in families["fxserve_request_duration_seconds"].samples if s.name.endswith("_bucket")]
    endpoints = {sample.labels.get("endpoint") for sample in buckets}
    assert "/healthz" in endpoints, f"bucket series carry endpoint labels {endpoints}"


def test_ready_gauge_is_one(live_server: Any) -> None:
    # FxservePodNotReady alerts on fxserve_ready == 0.
    families = scrape(live_server.base_url)
    values = [sample.value for sample in families["fxserve_ready"].samples]
    assert values == [1.0]
