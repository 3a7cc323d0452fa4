"""Response encodings: JSON lists, base64, safetensors and float16 decode to the same numbers."""

from __future__ import annotations

import json

import numpy as np
import torch.nn.functional as F
from safetensors.numpy import load as load_safetensors
from torchvision.models import ResNet18_Weights

from .conftest import as_array, multipart
from .reference import extract, open_rgb, preprocess_all


def reference_layer3(model, paths):
    batch = preprocess_all(ResNet18_Weights.IMAGENET1K_V1.transforms(), [open_rgb(p) for p in paths])
    return extract(model, ["layer3", "layer4"], batch)


def test_encoding_base64_decodes_to_reference(client, photos, reference_resnet18):
    paths = [photos["astronaut.jpg"], photos["coffee.jpg"]]
    response = client.post("/extract", params={"model": "resnet18", "layers": "layer3", "encoding": "base64"}, files=multipart(paths))

    assert response.status_code == 200, response.text
    expected = reference_layer3(reference_resnet18, paths)["layer3"].numpy()
    for index, result in enumerate(response.json()["results"]):
        entry = result["layer3"]
        assert entry["encoding"] == "base64"
        assert entry["byte_order"] == "little"
        np.testing.assert_allclose(as_array(entry), expected[index], rtol=1e-5, atol=1e-5)


def test_encoding_safetensors_keys_and_values(client, photos, reference_resnet18):
    paths = [photos["rocket.jpg"], photos["chelsea.png"]]
    response = client.post(
        "/extract",
        params={"model": "resnet18", "layers": "layer3,layer4"},
        files=multipart(paths),
        headers={"Accept": "application/vnd.safetensors"},
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/vnd.safetensors"
    tensors = load_safetensors(response.content)
    assert sorted(tensors) == ["0/layer3", "0/layer4", "1/layer3", "1/layer4"]
    expected = reference_layer3(reference_resnet18, paths)
    for index in range(2):
        for layer in ("layer3", "layer4"):
            np.testing.assert_allclose(tensors[f"{index}/{layer}"], expected[layer][index].numpy(), rtol=1e-5, atol=1e-5)


def test_encoding_safetensors_metadata(client, photos):
    response = client.post(
        "/extract",
        params={"model": "resnet18", "layers": "layer4", "pool": "max"},
        files=multipart([photos["rocket.jpg"]]),
        headers={"Accept": "application/vnd.safetensors"},
    )

    header_size = int.from_bytes(response.content[:8], "little")
    metadata = json.loads(response.content[8 : 8 + header_size])["__metadata__"]
    assert metadata["model"] == "resnet18"
    assert metadata["layers"] == "layer4"
    assert metadata["pool"] == "max"


def test_encoding_float16_within_half_precision(client, photos, reference_resnet18):
    paths = [photos["coffee.jpg"]]
    response = client.post("/extract", params={"model": "resnet18", "layers": "layer3", "dtype": "float16"}, files=multipart(paths))

    assert response.status_code == 200, response.text
    entry = response.json()["results"][0]["layer3"]
    assert entry["dtype"] == "float16"
    expected = reference_layer3(reference_resnet18, paths)["layer3"][0].numpy()
    np.testing.assert_allclose(as_array(entry).astype(np.float32), expected, rtol=1e-3, atol=1e-3)


def test_encoding_float16_base64_halves_the_bytes(client, photos):
    paths = [photos["coffee.jpg"]]
    full = client.post("/extract", params={"model": "resnet18", "layers": "layer3", "encoding": "base64"}, files=multipart(paths))
    half = client.post("/extract", params={"model": "resnet18", "layers": "layer3", "encoding": "base64", "dtype": "float16"}, files=multipart(paths))

    full_array = as_array(full.json()["results"][0]["layer3"])
    half_array = as_array(half.json()["results"][0]["layer3"])
    assert half_array.nbytes * 2 == full_array.nbytes
    np.testing.assert_allclose(half_array.astype(np.float32), full_array, rtol=1e-3, atol=1e-3)


def test_encoding_embed_safetensors(client, photos, reference_resnet18):
    paths = [photos["astronaut.jpg"], photos["rocket.jpg"]]
    response = client.post("/embed", params={"model": "resnet18"}, files=multipart(paths), headers={"Accept": "application/vnd.safetensors"})

    assert response.status_code == 200, response.text
    embeddings = load_safetensors(response.content)["embeddings"]
    expected = F.normalize(reference_layer3(reference_resnet18, paths)["layer4"].mean(dim=(2, 3)), dim=1).numpy()
    assert embeddings.shape == (2, 512)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)
