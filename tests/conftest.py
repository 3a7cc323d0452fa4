"""Shared fixtures: real photos, offline weights, and a real server on 127.0.0.1."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.models import ResNet18_Weights, mobilenet_v3_small, resnet18

from .reference import MOBILENET_PREPROCESS, MOBILENET_SEED, RESNET18_SEED
from .serverproc import REPO_ROOT, ServerProcess

SERVER_ENV = {
    "FXSERVE_MAX_IMAGES_PER_REQUEST": "8",
    "FXSERVE_MAX_IMAGE_BYTES": "3000000",
    "FXSERVE_MAX_IMAGE_PIXELS": "4000000",
    "FXSERVE_TORCH_THREADS": "2",
    "FXSERVE_DECODE_WORKERS": "2",
    "FXSERVE_SHUTDOWN_DELAY_S": "0.5",
}


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photographs shipped with scikit-image, saved as JPEG and PNG files."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    files = {
        "astronaut.jpg": data.astronaut(),
        "chelsea.png": data.chelsea(),
        "coffee.jpg": data.coffee(),
        "rocket.jpg": data.rocket(),
    }
    paths = {}
    for name, array in files.items():
        path = folder / name
        Image.fromarray(array).save(path, quality=92) if name.endswith(".jpg") else Image.fromarray(array).save(path)
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose cache contains a resnet18 state dict under the IMAGENET1K_V1 file name.

    The weights are random (seeded) because none can be downloaded here; the
    service loads them through the real weights-enum path.
    """
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    file_name = os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    torch.save(resnet18_state_dict(), checkpoints / file_name)
    return home


def resnet18_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(RESNET18_SEED)
    return resnet18().state_dict()


def mobilenet_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(MOBILENET_SEED)
    return mobilenet_v3_small().state_dict()


@pytest.fixture(scope="session")
def mobilenet_checkpoint(tmp_path_factory) -> Path:
    """A training-script style checkpoint: a ``state_dict`` wrapper with ``model.`` prefixes."""
    path = tmp_path_factory.mktemp("checkpoints") / "mobilenet_v3_small.pt"
    wrapped = {"epoch": 3, "state_dict": {f"model.{key}": value for key, value in mobilenet_state_dict().items()}}
    torch.save(wrapped, path)
    return path


def make_test_config(mobilenet_checkpoint: Path) -> dict:
    return {
        "models": {
            "resnet18": {
                "architecture": "resnet18",
                "weights": "IMAGENET1K_V1",
                "layers": {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4", "pooled": "flatten"},
                "default_layers": ["layer4"],
                "preprocess": "weights",
                "max_batch_size": 8,
                "max_wait_ms": 30,
            },
            "resnet18_cl": {
                "architecture": "resnet18",
                "weights": "IMAGENET1K_V1",
                "layers": {"layer1": "layer1", "layer4": "layer4"},
                "default_layers": ["layer4"],
                "preprocess": "weights",
                "memory_format": "channels_last",
            },
            "mobilenet": {
                "architecture": "mobilenet_v3_small",
                "weights": str(mobilenet_checkpoint),
                "layers": ["features.3", "features.12", "flatten"],
                "default_layers": ["features.12"],
                "preprocess": MOBILENET_PREPROCESS,
                "max_batch_size": 4,
                "max_wait_ms": 10,
            },
            "fpn": {
                "architecture": "fasterrcnn_mobilenet_v3_large_320_fpn",
                "weights": None,
                "kwargs": {"weights_backbone": None},
                "submodule": "backbone",
                "layers": {"fpn": "fpn", "body": "body.16"},
                "default_layers": ["fpn"],
                "preprocess": {"resize": [320, 320]},
            },
        }
    }


@dataclass
class LiveServer:
    base_url: str
    process: ServerProcess
    config: dict

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, torch_home, mobilenet_checkpoint) -> LiveServer:
    """The real service, started with ``python -m service serve`` on a free 127.0.0.1 port."""
    config = make_test_config(mobilenet_checkpoint)
    workdir = tmp_path_factory.mktemp("live_server")
    process = ServerProcess(config, workdir, env={**SERVER_ENV, "TORCH_HOME": str(torch_home)}, name="live")
    process.start().wait_ready()
    yield LiveServer(process.base_url, process, config)
    process.stop()


@pytest.fixture()
def client(live_server) -> httpx.Client:
    with live_server.client() as session:
        yield session


@pytest.fixture(scope="session")
def reference_resnet18() -> torch.nn.Module:
    model = resnet18()
    model.load_state_dict(resnet18_state_dict())
    return model.eval()


@pytest.fixture(scope="session")
def reference_mobilenet() -> torch.nn.Module:
    model = mobilenet_v3_small()
    model.load_state_dict(mobilenet_state_dict())
    return model.eval()


def as_array(encoded: dict) -> np.ndarray:
    """Turn one ``{"shape", "dtype", "data"}`` entry of a JSON response back into an array."""
    if encoded.get("encoding") == "base64":
        import base64

        raw = base64.b64decode(encoded["data"])
        return np.frombuffer(raw, dtype=np.dtype(encoded["dtype"]).newbyteorder("<")).reshape(encoded["shape"])
    return np.asarray(encoded["data"], dtype=encoded["dtype"]).reshape(encoded["shape"])


def multipart(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx ``files=`` for several images in the field ``images``."""
    return [("images", (path.name, path.read_bytes(), "application/octet-stream")) for path in paths]


__all__ = ["REPO_ROOT", "as_array", "multipart", "make_test_config", "LiveServer", "yaml"]
