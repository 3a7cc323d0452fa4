"""Ground truth: torchvision's own ``create_feature_extractor`` run in the test process.

Nothing here imports the service; results are what a user would get by hand.
"""

from __future__ import annotations

from pathlib import Path

import torch
import numpy as np
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.models import ResNet18_Weights
from torchvision.models.feature_extraction import create_feature_extractor

RESNET18_SEED = 1234
MOBILENET_SEED = 4321

MOBILENET_PREPROCESS = {"resize": 160, "crop": 128, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}


def open_rgb(path: Path | str) -> Image.Image:
    """Decode as a careful user would: EXIF orientation applied, converted to RGB."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def mapping_transform(preprocess: dict) -> T.Compose:
    """The torchvision transforms equivalent of a ``preprocess`` mapping in models.yaml."""
    return T.Compose([
        T.Resize(preprocess["resize"], interpolation=T.InterpolationMode(preprocess.get("interpolation", "bilinear")), antialias=True),
        T.CenterCrop(preprocess["crop"]),
        T.PILToTensor(),
        T.ConvertImageDtype(torch.float),
        T.Normalize(preprocess["mean"], preprocess["std"]),
    ])


def extract(model: torch.nn.Module, nodes: list[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run torchvision's extractor for ``nodes`` on a preprocessed batch."""
    extractor = create_feature_extractor(model.eval(), return_nodes={node: node for node in nodes})
    with torch.inference_mode():
        return extractor(batch)


def preprocess_all(transform, images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([transform(image) for image in images])


# Public layer names of the test config's resnet18 and the nodes they read.
RESNET_NODES = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4", "pooled": "flatten"}


def resnet_reference(model, paths, layers):
    batch = preprocess_all(ResNet18_Weights.IMAGENET1K_V1.transforms(), [open_rgb(p) for p in paths])
    outputs = extract(model, [RESNET_NODES[layer] for layer in layers], batch)
    return {layer: outputs[RESNET_NODES[layer]].numpy() for layer in layers}


def assert_same(served: np.ndarray, expected: np.ndarray) -> None:
    assert served.shape == expected.shape
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)
