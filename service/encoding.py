"""Response bodies: JSON with nested lists or base64, and safetensors.

JSON goes through orjson, which serialises numpy arrays in C instead of a Python
loop over floats. base64 and safetensors carry the raw little-endian bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from safetensors.numpy import save as save_safetensors

__all__ = ["ENCODINGS", "SAFETENSORS_MEDIA_TYPE", "encode_array", "dumps", "extract_safetensors", "embed_safetensors", "safetensors_key", "wants_safetensors"]

ENCODINGS = ("json", "base64")
SAFETENSORS_MEDIA_TYPE = "application/vnd.safetensors"
_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def dumps(payload: Any) -> bytes:
    return orjson.dumps(payload, option=_ORJSON_OPTIONS)


def encode_array(array: np.ndarray, encoding: str) -> dict[str, Any]:
    """Return ``{"shape", "dtype", "data"}`` with data as nested lists or base64 bytes."""
    array = np.ascontiguousarray(array)
    encoded: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if encoding == "base64":
        little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
        encoded["encoding"] = "base64"
        encoded["byte_order"] = "little"
        encoded["data"] = base64.b64encode(little_endian.tobytes()).decode("ascii")
    else:
        encoded["data"] = array
    return encoded


def safetensors_key(index: int, layer: str) -> str:
    """Key of one image's layer in a safetensors response: ``"<image index>/<layer>"``."""
    return f"{index}/{layer}"


def extract_safetensors(results: Sequence[dict[str, np.ndarray]], metadata: dict[str, str]) -> bytes:
    tensors = {
        safetensors_key(index, layer): np.ascontiguousarray(array)
        for index, outputs in enumerate(results)
        for layer, array in outputs.items()
    }
    return save_safetensors(tensors, metadata=metadata)


def embed_safetensors(embeddings: np.ndarray, metadata: dict[str, str]) -> bytes:
    return save_safetensors({"embeddings": np.ascontiguousarray(embeddings)}, metadata=metadata)


def wants_safetensors(accept: str | None) -> bool:
    """Pick safetensors when the Accept header prefers it to JSON (by q-value, then by order)."""
    if not accept:
        return False
    safetensors_rank = json_rank = None
    for position, entry in enumerate(accept.lower().split(",")):
        media_type, *parameters = (part.strip() for part in entry.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        rank = (quality, -position)
        if media_type == SAFETENSORS_MEDIA_TYPE:
            safetensors_rank = rank
        elif media_type in ("application/json", "application/*", "*/*") and (json_rank is None or rank > json_rank):
            json_rank = rank
    if safetensors_rank is None or safetensors_rank[0] <= 0:
        return False
    return json_rank is None or safetensors_rank > json_rank
