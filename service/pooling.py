"""Pooling, L2 normalisation and dtype casts, applied on the model's device.

Doing this before the copy to the host means a pooled request moves C numbers per
image instead of C x H x W.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["POOL_CHOICES", "OUTPUT_DTYPES", "pool_features", "finish_features"]

Pool = Literal["none", "avg", "max", "gem"]
POOL_CHOICES: tuple[str, ...] = ("none", "avg", "max", "gem")
OUTPUT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}

GEM_P = 3.0
_GEM_EPS = 1e-6


def pool_features(features: torch.Tensor, pool: str) -> torch.Tensor:
    """Reduce the spatial or token axes of a batch to one vector per image.

    ``(N, C, H, W)`` pools over H and W; ``(N, L, D)`` (transformer tokens) pools
    over L; ``(N, D)`` is returned unchanged. ``gem`` is generalised mean pooling
    with p=3 over values clamped to at least 1e-6, so negative activations count
    as 1e-6.
    """
    if pool == "none" or features.ndim <= 2:
        return features
    dims = _pooled_dims(features.ndim)
    if pool == "avg":
        return features.mean(dim=dims)
    if pool == "max":
        return features.amax(dim=dims)
    if pool == "gem":
        clamped = features.float().clamp(min=_GEM_EPS)
        return clamped.pow(GEM_P).mean(dim=dims).pow(1.0 / GEM_P).to(features.dtype)
    raise ValueError(f"unknown pool {pool!r}; valid: {', '.join(POOL_CHOICES)}")


def _pooled_dims(ndim: int) -> tuple[int, ...]:
    if ndim == 3:
        return (1,)
    return tuple(range(2, ndim))


def finish_features(features: torch.Tensor, pool: str, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    """Pool, optionally L2-normalise, and cast for the response.

    Normalisation divides each image's output, flattened, by its L2 norm; for a
    pooled output that is the usual unit-length embedding.
    """
    pooled = pool_features(features, pool)
    if normalize:
        pooled = F.normalize(pooled.float().flatten(1), p=2.0, dim=1).reshape(pooled.shape)
    return pooled.to(dtype)


def pooled_shape(shape: tuple[int, ...], pool: str) -> tuple[int, ...]:
    """Return the per-image shape after pooling; ``shape`` excludes the batch axis."""
    if pool == "none" or len(shape) <= 1:
        return tuple(shape)
    if len(shape) == 2:
        return (shape[1],)
    return (shape[0],)
