"""Small PNG files made in memory for tests that need many distinct images."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def noise_png(seed: int, size: int = 80) -> bytes:
    """Random RGB pixels: every seed gives a different image and different features."""
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def plain_png(value: int, size: int = 80) -> bytes:
    """One grey level everywhere; 0 and 255 trigger the fault model's hang and out-of-memory error."""
    return png_bytes(np.full((size, size, 3), value, dtype=np.uint8))
