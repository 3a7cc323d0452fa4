"""Two models serving at once while one of them keeps building new pruned extractors.

torch.fx tracing patches ``torch.nn.Module.__call__`` process-wide, so without
coordination a forward pass of one model fails while the other model traces.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import mobilenet_v3_small

from .conftest import as_array
from .imagefiles import noise_png
from .reference import extract, mapping_transform, preprocess_all
from .serverproc import ServerProcess

PREPROCESS = {"resize": 72, "crop": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
RESNET_LAYERS = ["layer1", "layer2", "layer3", "layer4", "flatten"]


@pytest.fixture(scope="module")
def two_model_server(tmp_path_factory):
    config = {"models": {
        # A cache of one extractor: every change of layer set traces a new one.
        "resnet18": {"architecture": "resnet18", "weights": None, "layers": RESNET_LAYERS, "preprocess": PREPROCESS, "extractor_cache_size": 1, "max_wait_ms": 2},
        "mobilenet": {"architecture": "mobilenet_v3_small", "weights": None, "layers": ["features.12"], "preprocess": PREPROCESS, "max_wait_ms": 2},
    }}
    env = {"FXSERVE_SHUTDOWN_DELAY_S": "0.1", "FXSERVE_TORCH_THREADS": "1", "FXSERVE_DECODE_WORKERS": "2"}
    server = ServerProcess(config, tmp_path_factory.mktemp("two_models"), env=env, name="two_models").start().wait_ready()
    yield server
    server.stop()


def test_concurrency_tracing_does_not_break_other_model(two_model_server):
    image = noise_png(3, size=64)
    requests = []
    for number in range(48):
        if number % 2:
            requests.append(("mobilenet", "features.12"))
        else:
            requests.append(("resnet18", RESNET_LAYERS[(number // 2) % len(RESNET_LAYERS)]))

    def send(request):
        model, layer = request
        files = [("images", ("noise.png", image, "image/png"))]
        return httpx.post(f"{two_model_server.base_url}/extract", params={"model": model, "layers": layer}, files=files, timeout=120)

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(send, requests))

    statuses = [response.status_code for response in responses]
    assert statuses == [200] * len(requests), [response.text[:300] for response in responses if response.status_code != 200][:3]

    # weights: null seeds torch with 0 before building, so this is the served model.
    torch.manual_seed(0)
    reference = mobilenet_v3_small(weights=None).eval()
    batch = preprocess_all(mapping_transform(PREPROCESS), [Image.open(BytesIO(image)).convert("RGB")])
    expected = extract(reference, ["features.12"], batch)["features.12"][0].numpy()
    for (model, _), response in zip(requests, responses):
        if model == "mobilenet":
            np.testing.assert_allclose(as_array(response.json()["results"][0]["features.12"]), expected, rtol=1e-5, atol=1e-5)
