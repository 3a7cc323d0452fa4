"""/embed: average-pooled, L2-normalised vectors with the provenance a vector database needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from torchvision.models import ResNet18_Weights

from .conftest import multipart
from .reference import extract, open_rgb, preprocess_all


def test_embed_matches_pooled_reference(client, photos, reference_resnet18):
    paths = [photos["astronaut.jpg"], photos["chelsea.png"], photos["rocket.jpg"]]
    response = client.post("/embed", params={"model": "resnet18", "layer": "layer3"}, files=multipart(paths))

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "resnet18"
    assert body["layer"] == "layer3"
    assert body["dim"] == 256
    batch = preprocess_all(ResNet18_Weights.IMAGENET1K_V1.transforms(), [open_rgb(p) for p in paths])
    expected = F.normalize(extract(reference_resnet18, ["layer3"], batch)["layer3"].mean(dim=(2, 3)), dim=1).numpy()
    embeddings = np.asarray(body["embeddings"], dtype=np.float32)
    assert embeddings.shape == (3, 256)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)
    for row in embeddings:
        assert np.linalg.norm(row) == pytest.approx(1.0, abs=1e-5)


def test_embed_default_layer_is_last_default_layer(client, photos):
    response = client.post("/embed", params={"model": "resnet18"}, files=multipart([photos["coffee.jpg"]]))

    assert response.status_code == 200, response.text
    assert response.json()["layer"] == "layer4"
    assert response.json()["dim"] == 512


def test_embed_provenance_names_what_to_store(client, photos):
    response = client.post("/embed", params={"model": "resnet18", "layer": "layer4"}, files=multipart([photos["coffee.jpg"]]))

    provenance = response.json()["provenance"]
    assert provenance["architecture"] == "resnet18"
    assert provenance["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert provenance["node"] == "layer4"
    assert provenance["pooling"] == "avg"
    assert provenance["normalization"] == "l2"
    assert provenance["preprocessing"]["resize"] == [256]
    assert provenance["preprocessing"]["crop"] == [224]
    assert provenance["preprocessing"]["mean"] == [0.485, 0.456, 0.406]


def test_embed_unknown_layer_lists_valid(client, photos):
    response = client.post("/embed", params={"model": "resnet18", "layer": "layer9"}, files=multipart([photos["coffee.jpg"]]))

    assert response.status_code == 422
    assert "layer9" in response.json()["error"]["message"]
    assert "layer4" in response.json()["error"]["message"]
