"""/extract over real HTTP, compared with torchvision's extractor run directly."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

from .conftest import as_array, multipart
from .reference import MOBILENET_PREPROCESS, assert_same, extract, mapping_transform, open_rgb, preprocess_all, resnet_reference

def test_extract_multipart_matches_torchvision(client, photos, reference_resnet18):
    paths = [photos["astronaut.jpg"], photos["chelsea.png"], photos["coffee.jpg"]]
    response = client.post("/extract", params={"model": "resnet18", "layers": "layer1,layer4,pooled"}, files=multipart(paths))

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "resnet18"
    assert body["layers"] == ["layer1", "layer4", "pooled"]
    assert body["pool"] == "none"
    assert len(body["results"]) == 3
    expected = resnet_reference(reference_resnet18, paths, ["layer1", "layer4", "pooled"])
    for index, result in enumerate(body["results"]):
        for layer in ("layer1", "layer4", "pooled"):
            assert result[layer]["dtype"] == "float32"
            assert_same(as_array(result[layer]), expected[layer][index])


def test_extract_json_base64_body(client, photos, reference_resnet18):
    paths = [photos["rocket.jpg"], photos["astronaut.jpg"]]
    payload = {"images": [base64.b64encode(p.read_bytes()).decode() for p in paths]}
    response = client.post("/extract", params={"model": "resnet18", "layers": "layer3"}, json=payload)

    assert response.status_code == 200, response.text
    expected = resnet_reference(reference_resnet18, paths, ["layer3"])["layer3"]
    for index, result in enumerate(response.json()["results"]):
        assert_same(as_array(result["layer3"]), expected[index])


def test_extract_raw_image_body(client, photos, reference_resnet18):
    path = photos["chelsea.png"]
    response = client.post("/extract?model=resnet18", content=path.read_bytes(), headers={"Content-Type": "image/png"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["layers"] == ["layer4"], "default_layers applies when layers is omitted"
    assert_same(as_array(body["results"][0]["layer4"]), resnet_reference(reference_resnet18, [path], ["layer4"])["layer4"][0])


@pytest.mark.parametrize("pool", ["avg", "max", "gem"])
def test_extract_pooling_matches_manual(client, photos, reference_resnet18, pool):
    paths = [photos["coffee.jpg"], photos["rocket.jpg"]]
    response = client.post("/extract", params={"model": "resnet18", "layers": "layer3", "pool": pool, "normalize": "true"}, files=multipart(paths))

    assert response.status_code == 200, response.text
    features = torch.from_numpy(resnet_reference(reference_resnet18, paths, ["layer3"])["layer3"])
    if pool == "avg":
        pooled = features.mean(dim=(2, 3))
    elif pool == "max":
        pooled = features.amax(dim=(2, 3))
    else:
        pooled = features.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    expected = F.normalize(pooled, dim=1).numpy()
    for index, result in enumerate(response.json()["results"]):
        served = as_array(result["layer3"])
        assert served.shape == (256,)
        np.testing.assert_allclose(served, expected[index], rtol=1e-5, atol=1e-6)
        assert np.linalg.norm(served) == pytest.approx(1.0, abs=1e-5)


def test_extract_checkpoint_model_with_mapping_preprocess(client, photos, reference_mobilenet):
    paths = [photos["astronaut.jpg"], photos["coffee.jpg"]]
    response = client.post("/extract", params={"model": "mobilenet", "layers": "features.3,flatten"}, files=multipart(paths))

    assert response.status_code == 200, response.text
    batch = preprocess_all(mapping_transform(MOBILENET_PREPROCESS), [open_rgb(p) for p in paths])
    expected = extract(reference_mobilenet, ["features.3", "flatten"], batch)
    for index, result in enumerate(response.json()["results"]):
        assert_same(as_array(result["features.3"]), expected["features.3"][index].numpy())
        assert_same(as_array(result["flatten"]), expected["flatten"][index].numpy())


def test_extract_fpn_entries_as_layers(client, photos):
    paths = [photos["rocket.jpg"]]
    response = client.post("/extract", params={"model": "fpn"}, files=multipart(paths))

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["layers"] == ["fpn.0", "fpn.1", "fpn.pool"]
    # weights: null serves weights initialised after torch.manual_seed(0).
    torch.manual_seed(0)
    backbone = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).backbone
    transform = mapping_transform({"resize": [320, 320], "crop": [320, 320], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    expected = extract(backbone, ["fpn"], preprocess_all(transform, [open_rgb(paths[0])]))["fpn"]
    for key in ("0", "1", "pool"):
        assert_same(as_array(body["results"][0][f"fpn.{key}"]), expected[key][0].numpy())


def test_extract_keeps_input_order(client, photos):
    paths = [photos["astronaut.jpg"], photos["rocket.jpg"], photos["astronaut.jpg"]]
    response = client.post("/extract", params={"model": "resnet18", "layers": "pooled"}, files=multipart(paths))

    results = [as_array(r["pooled"]) for r in response.json()["results"]]
    np.testing.assert_array_equal(results[0], results[2])
    assert not np.allclose(results[0], results[1])


def test_extract_channels_last_close_to_reference(client, photos, reference_resnet18):
    paths = [photos["astronaut.jpg"], photos["coffee.jpg"]]
    response = client.post("/extract", params={"model": "resnet18_cl", "layers": "layer1,layer4"}, files=multipart(paths))

    assert response.status_code == 200, response.text
    expected = resnet_reference(reference_resnet18, paths, ["layer1", "layer4"])
    for index, result in enumerate(response.json()["results"]):
        for layer in ("layer1", "layer4"):
            served = as_array(result[layer])
            assert served.shape == expected[layer][index].shape
            # Other convolution kernels round differently; values stay within float32 noise.
            np.testing.assert_allclose(served, expected[layer][index], rtol=1e-4, atol=1e-4)
