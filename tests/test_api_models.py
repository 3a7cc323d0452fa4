"""Model metadata, probes, docs and metrics over real HTTP.

Layer shapes are compared with torchvision's own extractor run in the test
process, and node lists with ``get_graph_node_names``. The server is the
session's ``live_server`` (resnet18, resnet18_cl, mobilenet and fpn, see ``make_test_config``).
"""

from __future__ import annotations

import math

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torchvision.models import ResNet18_Weights, mobilenet_v3_small, resnet18
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn
from torchvision.models.feature_extraction import get_graph_node_names

from .conftest import multipart
from .reference import MOBILENET_PREPROCESS, extract

MODEL_NAMES = ["resnet18", "resnet18_cl", "mobilenet", "fpn"]
EXPECTED_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def configured_layers(config: dict) -> dict[str, str]:
    """Return a model's ``layers`` as name -> node. A plain list means name = node."""
    layers = config["layers"]
    return {node: node for node in layers} if isinstance(layers, list) else dict(layers)


def reference_layers(module: torch.nn.Module, layers: dict[str, str], size: tuple[int, int]) -> dict[str, dict]:
    """Run torchvision's extractor on one zero image and describe each public layer.

    A node with a dict output (the FPN) becomes one layer per entry, named
    ``<layer>.<key>``, which is how the service publishes it.
    """
    outputs = extract(module, sorted(set(layers.values())), torch.zeros(1, 3, *size))
    described = {}
    for name, node in layers.items():
        output = outputs[node]
        if isinstance(output, torch.Tensor):
            described[name] = {"node": node, "entry": None, "shape": list(output.shape[1:])}
            continue
        for key, tensor in output.items():
            described[f"{name}.{key}"] = {"node": node, "entry": str(key), "shape": list(tensor.shape[1:])}
    return described


@pytest.fixture(scope="module")
def expected_layers(live_server, reference_resnet18) -> dict[str, dict[str, dict]]:
    models = live_server.config["models"]
    fpn_backbone = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).backbone
    return {
        "resnet18": reference_layers(reference_resnet18, configured_layers(models["resnet18"]), (224, 224)),
        "resnet18_cl": reference_layers(reference_resnet18, configured_layers(models["resnet18_cl"]), (224, 224)),
        "mobilenet": reference_layers(mobilenet_v3_small(), configured_layers(models["mobilenet"]), (128, 128)),
        "fpn": reference_layers(fpn_backbone, configured_layers(models["fpn"]), (320, 320)),
    }


@pytest.fixture(scope="module")
def described(live_server) -> dict[str, dict]:
    with live_server.client() as session:
        response = session.get("/models")
    assert response.status_code == 200, response.text
    return {model["name"]: model for model in response.json()["models"]}


def metric_samples(client) -> dict[tuple[str, frozenset], float]:
    """Scrape /metrics and index every sample by its name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric_families(client) -> dict[str, str]:
    """Scrape /metrics and return each family's name and type."""
    return {family.name: family.type for family in text_string_to_metric_families(client.get("/metrics").text)}


def labels(**pairs: str) -> frozenset:
    return frozenset(pairs.items())


def parse_server_timing(header: str) -> dict[str, float]:
    """Parse ``name;dur=ms, ...`` into {name: ms}."""
    timings = {}
    for metric in header.split(","):
        name, _, parameters = metric.strip().partition(";")
        for parameter in parameters.split(";"):
            key, _, value = parameter.strip().partition("=")
            if key == "dur":
                timings[name] = float(value)
    return timings


# --- /models --------------------------------------------------------------


def test_models_lists_every_configured_model(described):
    assert list(described) == MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_layers_match_torchvision(described, expected_layers, name):
    served = described[name]["layers"]
    expected = expected_layers[name]

    assert list(served) == list(expected)
    for layer, reference in expected.items():
        assert served[layer]["node"] == reference["node"], layer
        assert served[layer]["entry"] == reference["entry"], layer
        assert served[layer]["shape"] == reference["shape"], layer
        assert served[layer]["dtype"] == "float32", layer


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_embedding_dim_is_channels(described, name):
    # Every layer here is [C, H, W] or [C], and average pooling keeps C.
    for layer, info in described[name]["layers"].items():
        assert info["embedding_dim"] == info["shape"][0], layer


def test_models_default_layers(described):
    assert described["resnet18"]["default_layers"] == ["layer4"]
    assert described["mobilenet"]["default_layers"] == ["features.12"]
    assert described["fpn"]["default_layers"] == ["fpn.0", "fpn.1", "fpn.pool"], "a dict-valued layer expands to its entries"


def test_models_preprocess_from_weights(described):
    preset = ResNet18_Weights.IMAGENET1K_V1.transforms()
    preprocess = described["resnet18"]["preprocess"]

    assert preprocess["resize"] == list(preset.resize_size)
    assert preprocess["crop"] == list(preset.crop_size)
    assert preprocess["mean"] == pytest.approx(list(preset.mean))
    assert preprocess["std"] == pytest.approx(list(preset.std))
    assert preprocess["interpolation"] == preset.interpolation.value
    assert preprocess["source"] == "ResNet18_Weights.IMAGENET1K_V1.transforms()"


def test_models_preprocess_from_mapping(described):
    preprocess = described["mobilenet"]["preprocess"]

    assert preprocess["resize"] == [MOBILENET_PREPROCESS["resize"]]
    assert preprocess["crop"] == [MOBILENET_PREPROCESS["crop"]]
    assert preprocess["mean"] == pytest.approx(MOBILENET_PREPROCESS["mean"])
    assert preprocess["std"] == pytest.approx(MOBILENET_PREPROCESS["std"])
    assert preprocess["interpolation"] == MOBILENET_PREPROCESS["interpolation"]
    assert preprocess["source"] == "config"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_device_and_dtype(described, name):
    assert described[name]["device"] == EXPECTED_DEVICE
    assert described[name]["dtype"] == "float32"
    assert described[name]["status"] == "ready"


def test_models_weights(described, live_server):
    assert described["resnet18"]["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert described["resnet18"]["random_weights"] is False
    assert described["mobilenet"]["weights"] == live_server.config["models"]["mobilenet"]["weights"]
    assert described["mobilenet"]["random_weights"] is False
    assert described["fpn"]["weights"] == "random (seed 0)"
    assert described["fpn"]["random_weights"] is True


def test_models_single_model(client, expected_layers):
    response = client.get("/models/mobilenet")

    assert response.status_code == 200, response.text
    assert response.json()["name"] == "mobilenet"
    assert list(response.json()["layers"]) == list(expected_layers["mobilenet"])


def test_models_nodes_match_torchvision(client):
    response = client.get("/models/resnet18/nodes")
    train, eval_ = get_graph_node_names(resnet18())

    assert response.status_code == 200, response.text
    assert response.json()["model"] == "resnet18"
    assert response.json()["train"] == train
    assert response.json()["eval"] == eval_


@pytest.mark.parametrize("path", ["/models/resnet5", "/models/resnet5/nodes"])
def test_models_unknown_name_is_404(client, path):
    response = client.get(path)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "resnet5" in response.json()["error"]["message"]
    assert "resnet18" in response.json()["error"]["message"], "the message should list the configured models"


# --- probes and docs ------------------------------------------------------


def test_healthz_alive(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["status"] == "alive"


def test_readyz_ready(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json()["status"] == "ready"
    assert response.json()["state"] == "ready"
    assert response.json()["models"] == {name: "ready" for name in MODEL_NAMES}


def test_docs_page_served(client):
    response = client.get("/docs")

    assert response.status_code == 200
    assert "swagger" in response.text.lower()


def test_openapi_lists_routes(client):
    response = client.get("/openapi.json")

    assert response.status_code == 200
    for path in ("/extract", "/embed", "/models", "/models/{name}", "/models/{name}/nodes", "/healthz", "/readyz", "/metrics"):
        assert path in response.json()["paths"], path


# --- response headers -----------------------------------------------------


def test_extract_server_timing_header(client, photos):
    response = client.post("/extract", params={"model": "resnet18", "layers": "pooled"}, files=multipart([photos["coffee.jpg"]]))
    timings = parse_server_timing(response.headers.get("server-timing", ""))

    assert response.status_code == 200, response.text
    for name in ("queue", "inference", "total"):
        assert name in timings, f"Server-Timing lacks {name}: {response.headers.get('server-timing')}"
        assert timings[name] >= 0, name
    assert timings["inference"] > 0
    assert timings["total"] >= timings["inference"]


def test_extract_request_id_generated(client, photos):
    response = client.post("/extract", params={"model": "resnet18", "layers": "pooled"}, files=multipart([photos["coffee.jpg"]]))

    assert response.status_code == 200, response.text
    assert response.headers.get("x-request-id")


def test_extract_request_id_echoed(client, photos):
    headers = {"X-Request-ID": "test-models-42"}
    response = client.post("/extract", params={"model": "resnet18", "layers": "pooled"}, files=multipart([photos["coffee.jpg"]]), headers=headers)

    assert response.status_code == 200, response.text
    assert response.headers.get("x-request-id") == "test-models-42"


# --- /metrics -------------------------------------------------------------


def test_metrics_count_extract_requests(client, photos):
    before = metric_samples(client)
    batches = [[photos["astronaut.jpg"], photos["rocket.jpg"], photos["chelsea.png"]], [photos["coffee.jpg"], photos["rocket.jpg"]]]
    for paths in batches:
        response = client.post("/extract", params={"model": "resnet18", "layers": "pooled"}, files=multipart(paths))
        assert response.status_code == 200, response.text
    after = metric_samples(client)

    def increase(sample_name: str, sample_labels: frozenset) -> float:
        return after.get((sample_name, sample_labels), 0.0) - before.get((sample_name, sample_labels), 0.0)

    assert increase("fxserve_images_total", labels(model="resnet18")) == 5
    assert increase("fxserve_requests_total", labels(endpoint="/extract", model="resnet18", status="200")) == 2
    assert increase("fxserve_request_duration_seconds_count", labels(endpoint="/extract")) == 2
    assert increase("fxserve_forward_duration_seconds_count", labels(model="resnet18")) >= 1


def test_metrics_histograms_exist(client):
    families = metric_families(client)

    assert families.get("fxserve_request_duration_seconds") == "histogram"
    assert families.get("fxserve_forward_duration_seconds") == "histogram"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_metrics_per_model_gauges(client, name):
    samples = metric_samples(client)
    load_seconds = samples.get(("fxserve_model_load_seconds", labels(model=name)))
    queue_depth = samples.get(("fxserve_queue_depth", labels(model=name)))

    assert load_seconds is not None
    assert load_seconds > 0
    assert math.isfinite(load_seconds)
    assert queue_depth is not None
    assert queue_depth >= 0


def test_metrics_ready_is_one(client):
    samples = metric_samples(client)

    assert samples.get(("fxserve_ready", frozenset())) == 1
