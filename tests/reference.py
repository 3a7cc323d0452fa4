"""Ground truth: torchvision's own ``create_feature_extractor`` run in the test process.

Nothing here imports the service; results are what a user would get by hand.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision import transforms as T
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
