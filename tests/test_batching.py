"""Dynamic batching over real HTTP: concurrent requests share forward passes and
each still gets exactly its own images' outputs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from torchvision.models import ResNet18_Weights

from .conftest import as_array, multipart
from .reference import MOBILENET_PREPROCESS, RESNET_NODES, extract, mapping_transform, open_rgb, preprocess_all

def histogram_sums(metrics_text: str, name: str, model: str) -> tuple[float, float]:
    """Return (sum, count) of a histogram's samples for one model."""
    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total, count


def test_batching_concurrent_requests_get_their_own_outputs(live_server, photos, reference_resnet18):
    names = ["astronaut.jpg", "chelsea.png", "coffee.jpg", "rocket.jpg"]
    all_images = [open_rgb(photos[name]) for name in names]
    batch = preprocess_all(ResNet18_Weights.IMAGENET1K_V1.transforms(), all_images)
    reference = {layer: tensor.numpy() for layer, tensor in extract(reference_resnet18, list(RESNET_NODES.values()), batch).items()}

    # 24 requests: each a different mix of images, layers and pooling.
    layer_sets = [["layer1"], ["layer4"], ["layer2", "pooled"], ["layer3", "layer4"]]
    requests = []
    for number in range(24):
        picks = [(number + offset) % 4 for offset in range(1 + number % 3)]
        requests.append((picks, layer_sets[number % 4], "avg" if number % 5 == 0 else "none"))

    with live_server.client() as client:
        before = client.get("/metrics").text

    def send(request):
        picks, layers, pool = request
        with live_server.client() as client:
            response = client.post(
                "/extract",
                params={"model": "resnet18", "layers": ",".join(layers), "pool": pool},
                files=multipart([photos[names[i]] for i in picks]),
            )
        return request, response

    with ThreadPoolExecutor(max_workers=12) as pool_executor:
        answers = list(pool_executor.map(send, requests))

    for (picks, layers, pool), response in answers:
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == len(picks)
        for result, pick in zip(results, picks):
            assert sorted(result) == sorted(layers)
            for layer in layers:
                expected = torch.from_numpy(reference[RESNET_NODES[layer]][pick])
                if pool == "avg" and expected.ndim == 3:
                    expected = expected.mean(dim=(1, 2))
                np.testing.assert_allclose(as_array(result[layer]), expected.numpy(), rtol=1e-5, atol=1e-5)

    with live_server.client() as client:
        after = client.get("/metrics").text
    images_sum_before, batches_before = histogram_sums(before, "fxserve_batch_images", "resnet18")
    images_sum_after, batches_after = histogram_sums(after, "fxserve_batch_images", "resnet18")
    images = images_sum_after - images_sum_before
    batches = batches_after - batches_before
    assert images == sum(len(picks) for picks, _, _ in requests)
    assert batches < images, f"{images:.0f} images ran in {batches:.0f} batches: no batching happened"


def test_batching_request_larger_than_max_batch_spans_batches(client, photos, reference_mobilenet):
    # The mobilenet model has max_batch_size 4; seven images need at least two passes.
    names = ["astronaut.jpg", "chelsea.png", "coffee.jpg", "rocket.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"]
    paths = [photos[name] for name in names]
    response = client.post("/extract", params={"model": "mobilenet", "layers": "flatten"}, files=multipart(paths))

    assert response.status_code == 200, response.text
    batch_sizes = [int(size) for size in response.headers["X-Batch-Sizes"].split(",")]
    assert max(batch_sizes) <= 4
    batch = preprocess_all(mapping_transform(MOBILENET_PREPROCESS), [open_rgb(p) for p in paths])
    expected = extract(reference_mobilenet, ["flatten"], batch)["flatten"].numpy()
    results = response.json()["results"]
    assert len(results) == 7
    for index, result in enumerate(results):
        np.testing.assert_allclose(as_array(result["flatten"]), expected[index], rtol=1e-5, atol=1e-5)


def test_batching_embed_and_extract_share_a_model(live_server, photos, reference_resnet18):
    paths = [photos["chelsea.png"], photos["rocket.jpg"]]

    def embed(_):
        with live_server.client() as client:
            return client.post("/embed", params={"model": "resnet18", "layer": "layer4"}, files=multipart(paths))

    def extract_layer1(_):
        with live_server.client() as client:
            return client.post("/extract", params={"model": "resnet18", "layers": "layer1"}, files=multipart(paths))

    with ThreadPoolExecutor(max_workers=6) as executor:
        embeds = list(executor.map(embed, range(3)))
        extracts = list(executor.map(extract_layer1, range(3)))

    batch = preprocess_all(ResNet18_Weights.IMAGENET1K_V1.transforms(), [open_rgb(p) for p in paths])
    reference = extract(reference_resnet18, ["layer1", "layer4"], batch)
    expected_embeddings = F.normalize(reference["layer4"].mean(dim=(2, 3)), dim=1).numpy()
    for response in embeds:
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.asarray(response.json()["embeddings"], dtype=np.float32), expected_embeddings, rtol=1e-5, atol=1e-6)
    for response in extracts:
        assert response.status_code == 200, response.text
        for index, result in enumerate(response.json()["results"]):
            np.testing.assert_allclose(as_array(result["layer1"]), reference["layer1"][index].numpy(), rtol=1e-5, atol=1e-5)
