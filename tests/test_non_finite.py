"""NaN and infinity in outputs: JSON shows null, the binary encodings keep IEEE values."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import load as load_safetensors
from torchvision.models import resnet18

from .serverproc import ServerProcess


@pytest.fixture(scope="module")
def overflow_server(tmp_path_factory):
    # Logits of about 1e5 overflow float16, whose largest finite value is 65504.
    folder = tmp_path_factory.mktemp("overflow")
    torch.manual_seed(7)
    state = resnet18().state_dict()
    state["fc.weight"] = state["fc.weight"] * 1e5
    checkpoint = folder / "resnet18_huge_fc.pt"
    torch.save(state, checkpoint)
    config = {"models": {"huge": {
        "architecture": "resnet18",
        "weights": str(checkpoint),
        "layers": {"logits": "fc"},
        "preprocess": {"resize": 64, "crop": 64},
    }}}
    server = ServerProcess(config, folder, env={"FXSERVE_SHUTDOWN_DELAY_S": "0.1"}, name="overflow").start().wait_ready()
    yield server
    server.stop()


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def post(server: ServerProcess, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}/extract", params={"dtype": "float16"}, files=[("images", ("noise.png", png(), "image/png"))], timeout=60, **kwargs)


def test_non_finite_json_shows_null(overflow_server):
    response = post(overflow_server)

    assert response.status_code == 200, response.text
    data = response.json()["results"][0]["logits"]["data"]
    assert None in data
    assert all(value is None or abs(value) <= 65504 for value in data)


def test_non_finite_safetensors_keeps_infinity(overflow_server):
    response = post(overflow_server, headers={"Accept": "application/vnd.safetensors"})

    logits = load_safetensors(response.content)["0/logits"]
    assert np.isinf(logits).any()


def test_non_finite_counted_and_logged(overflow_server):
    post(overflow_server)
    metrics = httpx.get(f"{overflow_server.base_url}/metrics").text
    counted = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "fxserve_non_finite_values_total" and sample.labels.get("model") == "huge"
    ]

    assert counted and counted[0] > 0
    assert "NaN or infinite values" in overflow_server.log()
