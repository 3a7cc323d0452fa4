"""Models that fail on purpose, for testing the service's fault handling.

``FaultGuard`` is a leaf module (list it in ``tracer.leaf_modules``) because its
Python branches on tensor values cannot be traced by ``torch.fx``. It looks at the
preprocessed batch and:

- raises ``torch.OutOfMemoryError`` when the batch has more than ``max_batch``
  images, so the service must split it;
- raises ``torch.OutOfMemoryError`` for a batch that contains a plain white image,
  even alone, so only that image's request may fail;
- sleeps ``hang_s`` seconds when the batch contains a plain black image, so the
  worker looks stalled;
- sleeps ``delay_s`` seconds on every batch, to make a slow model for overload tests.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torchvision.models import resnet18

# With ImageNet mean and std, a white pixel normalises to more than 2.2 in every
# channel and a black one to less than -1.7.
_WHITE_MIN = 2.0
_BLACK_MAX = -1.5


class FaultGuard(nn.Module):
    def __init__(self, max_batch: int, hang_s: float, delay_s: float) -> None:
        super().__init__()
        self.max_batch = max_batch
        self.hang_s = hang_s
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_image = x.flatten(1)
        if bool((per_image.min(dim=1).values > _WHITE_MIN).any()):
            raise torch.OutOfMemoryError("injected: out of memory on a white image")
        if x.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError(f"injected: out of memory on a batch of {x.shape[0]} > {self.max_batch}")
        if bool((per_image.max(dim=1).values < _BLACK_MAX).any()):
            time.sleep(self.hang_s)
        if self.delay_s:
            time.sleep(self.delay_s)
        return x


class FaultyResNet(nn.Module):
    def __init__(self, max_batch: int, hang_s: float, delay_s: float) -> None:
        super().__init__()
        self.guard = FaultGuard(max_batch, hang_s, delay_s)
        self.net = resnet18()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.guard(x))


def faulty_resnet18(max_batch: int = 2, hang_s: float = 3.0, delay_s: float = 0.0, build_delay_s: float = 0.0) -> FaultyResNet:
    """Build the model with random weights seeded by the service (``weights: null``).

    ``build_delay_s`` makes the build itself slow, to observe the loading state.
    """
    time.sleep(build_delay_s)
    return FaultyResNet(max_batch, hang_s, delay_s)


def faulty_config(**kwargs) -> dict:
    """A models.yaml entry serving ``faulty_resnet18`` with the given keyword arguments."""
    return {
        "architecture": "tests.fault_models:faulty_resnet18",
        "weights": None,
        "kwargs": kwargs,
        "layers": {"layer1": "net.layer1", "pooled": "net.flatten"},
        "default_layers": ["pooled"],
        "preprocess": {"resize": 64, "crop": 64},
        "tracer": {"leaf_modules": ["tests.fault_models:FaultGuard"]},
        "max_batch_size": 8,
        "max_wait_ms": 50,
    }
