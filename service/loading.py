"""Build a configured model: architecture, weights, submodule, preprocessing.

Weights come in three forms: a torchvision weights enum member (downloaded by
torchvision into ``$TORCH_HOME/hub/checkpoints`` when missing), a checkpoint path
(loaded with ``torch.load(weights_only=True)``), or ``null`` for random weights.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import get_model_builder, get_model_weights, list_models

from .config import ModelConfig
from .errors import CheckpointMismatchError, ConfigError, WeightsUnavailableError, closest
from .preprocess import Preprocessor, preprocessor_from_config, preprocessor_from_weights

__all__ = ["LoadedModel", "load_model", "import_object", "resolve_weights", "checkpoint_path_for", "weights_cache_dir"]

logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_KEY_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass(frozen=True)
class LoadedModel:
    """A model on the CPU in eval mode, with the facts clients need to reproduce it."""

    module: nn.Module
    preprocessor: Preprocessor
    weights_description: str
    random_weights: bool


def import_object(path: str) -> Any:
    """Import ``package.module:attribute`` (or ``package.module.attribute``)."""
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ImportError(f"{path!r} is not an import path; use 'package.module:name'")
    module = importlib.import_module(module_name)
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def weights_cache_dir() -> Path:
    """Return the folder torchvision downloads weights into."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def checkpoint_path_for(weights: Enum) -> Path:
    """Return where torchvision caches the file of a weights enum member."""
    file_name = os.path.basename(urlparse(weights.value.url).path)
    return weights_cache_dir() / file_name


def load_model(name: str, config: ModelConfig, *, random_init: bool = False) -> LoadedModel:
    """Build the model, load its weights and pick its preprocessing; raise ConfigError.

    With ``random_init`` no weights are read or downloaded (for ``check`` and
    ``nodes``), and a builder's ``weights_backbone`` defaults to None.
    """
    builder = _resolve_builder(name, config.architecture)
    weights = resolve_weights(name, config)

    if random_init:
        extra: dict[str, Any] = {"weights": None} if _is_torchvision(config) else {}
        if "weights_backbone" in inspect.signature(builder).parameters and "weights_backbone" not in config.kwargs:
            extra["weights_backbone"] = None
        module = _call_builder(name, config, builder, extra)
        description = "random (not loaded)"
    elif isinstance(weights, Enum):
        module = _build_with_enum(name, config, builder, weights)
        description = f"{type(weights).__name__}.{weights.name}"
    else:
        if weights is None:
            # A fixed seed makes random weights the same in every process and replica.
            torch.manual_seed(0)
        module = _call_builder(name, config, builder, {"weights": None} if _is_torchvision(config) else {})
        description = "random (seed 0)" if weights is None else str(weights)
        if weights is None:
            logger.warning(
                "model %s: weights is null, so it serves RANDOM weights; its features are "
                "meaningless. Set weights to a weights enum member or a checkpoint path.",
                name,
            )
        else:
            _load_checkpoint(name, module, weights)

    if config.submodule:
        module = _select_submodule(name, module, config.submodule)
    module.eval()
    module.requires_grad_(False)

    preprocessor = _resolve_preprocessor(name, config, weights)
    return LoadedModel(module, preprocessor, description, random_init or weights is None)


def resolve_weights(name: str, config: ModelConfig) -> Enum | Path | None:
    """Turn the ``weights`` field into an enum member, a checkpoint path, or None."""
    value = config.weights
    if value is None or value.lower() in {"none", "null", "random"}:
        return None
    if _looks_like_path(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(name, "weights", f"checkpoint file {path} does not exist", "Check the path, or use a weights enum member")
        return path
    if "." in value:
        try:
            return torchvision.models.get_weight(value)
        except (ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(name, "weights", f"{value!r} is not a torchvision weights member ({exc})") from None
    if not _is_torchvision(config):
        raise ConfigError(
            name, "weights", f"{value!r} needs a weights enum, but {config.architecture} is not a torchvision model name",
            "Write the full name, e.g. ResNet50_Weights.IMAGENET1K_V2, or a checkpoint path",
        )
    enum_class = get_model_weights(config.architecture)
    if value == "DEFAULT":
        return enum_class.DEFAULT
    members = [m.name for m in enum_class]
    if value not in members:
        raise ConfigError(
            name, "weights", f"{value!r} is not a member of {enum_class.__name__}",
            f"Valid values: DEFAULT, {', '.join(members)}, null, or a checkpoint path",
        )
    return enum_class[value]


def _is_torchvision(config: ModelConfig) -> bool:
    return ":" not in config.architecture


def _looks_like_path(value: str) -> bool:
    return "/" in value or os.sep in value or value.endswith(_CHECKPOINT_SUFFIXES)


def _resolve_builder(name: str, architecture: str) -> Callable[..., nn.Module]:
    if ":" in architecture:
        try:
            builder = import_object(architecture)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(name, "architecture", f"cannot import {architecture!r}: {exc}", "Use 'package.module:callable' and check PYTHONPATH") from None
        if not callable(builder):
            raise ConfigError(name, "architecture", f"{architecture!r} is not callable")
        return builder
    try:
        return get_model_builder(architecture)
    except ValueError:
        suggestions = closest(architecture, list_models())
        hint = f"Did you mean: {', '.join(suggestions)}?" if suggestions else "See torchvision.models.list_models()"
        raise ConfigError(name, "architecture", f"{architecture!r} is not a torchvision model", hint) from None


def _call_builder(name: str, config: ModelConfig, builder: Callable[..., nn.Module], extra: Mapping[str, Any]) -> nn.Module:
    try:
        module = builder(**extra, **config.kwargs)
    except TypeError as exc:
        raise ConfigError(name, "kwargs", f"{config.architecture} rejected its arguments: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(name, "architecture", f"{config.architecture} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _build_with_enum(name: str, config: ModelConfig, builder: Callable[..., nn.Module], weights: Enum) -> nn.Module:
    cached = checkpoint_path_for(weights)
    try:
        return _call_builder(name, config, builder, {"weights": weights, "progress": False})
    except ConfigError:
        raise
    except Exception as exc:  # download and unpickling errors have no common base
        if cached.is_file():
            raise ConfigError(name, "weights", f"the cached file {cached} could not be loaded: {exc}", "Delete it so it is downloaded again") from exc
        raise WeightsUnavailableError(
            name, "weights",
            f"{type(weights).__name__}.{weights.name} is not cached and the download from {weights.value.url} failed ({type(exc).__name__}: {exc})",
            f"Put {cached.name} into {cached.parent} (the hub/checkpoints folder under TORCH_HOME), "
            "or run 'python -m service prefetch' where the network is reachable",
        ) from exc


def _load_checkpoint(name: str, module: nn.Module, path: Path) -> None:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, disallowed globals
        raise ConfigError(name, "weights", f"cannot load checkpoint {path} with weights_only=True: {exc}") from exc
    state_dict = _unwrap_state_dict(loaded)
    if state_dict is None:
        raise ConfigError(name, "weights", f"checkpoint {path} contains {type(loaded).__name__}, not a state dict")
    try:
        result = module.load_state_dict(_strip_prefixes(state_dict, module), strict=False)
    except RuntimeError as exc:  # strict=False still raises on tensors of the wrong shape
        # Drop torch's "Error(s) in loading state_dict" header and join its per-tensor lines.
        mismatches = " ".join(line.strip() for line in str(exc).splitlines()[1:]).rstrip(".")
        raise CheckpointMismatchError(
            name, "weights", f"checkpoint {path} does not fit {type(module).__name__}: {mismatches or exc}",
            "Check that architecture (and kwargs such as num_classes) match the checkpoint",
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointMismatchError(
            name, "weights",
            f"checkpoint {path} does not fit {type(module).__name__}: "
            f"missing keys {_preview(result.missing_keys)}, unexpected keys {_preview(result.unexpected_keys)}",
            "Check that architecture (and kwargs such as num_classes) match the checkpoint",
        )


def _unwrap_state_dict(loaded: Any) -> dict[str, torch.Tensor] | None:
    for _ in range(3):
        if not isinstance(loaded, Mapping):
            return None
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return dict(loaded)
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if wrapper is None:
            return None
        loaded = loaded[wrapper]
    return None


def _strip_prefixes(state_dict: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    expected = set(module.state_dict())
    for prefix in _KEY_PREFIXES:
        if not set(state_dict) & expected and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _preview(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "[]"
    listed = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{listed}{more}]"


def _select_submodule(name: str, module: nn.Module, path: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        children = [child for child, _ in module.named_children()]
        raise ConfigError(name, "submodule", f"{type(module).__name__} has no submodule {path!r}", f"Top-level children: {', '.join(children)}") from None


def _resolve_preprocessor(name: str, config: ModelConfig, weights: Enum | Path | None) -> Preprocessor:
    if config.preprocess != "weights":
        return preprocessor_from_config(config.preprocess)
    if not isinstance(weights, Enum):
        raise ConfigError(
            name, "preprocess", "'weights' needs a weights enum member, but weights is a checkpoint or null",
            "Give a mapping such as {resize: 256, crop: 224, mean: [...], std: [...]}",
        )
    try:
        return preprocessor_from_weights(weights)
    except ValueError as exc:
        raise ConfigError(name, "preprocess", str(exc), "Give an explicit mapping with a fixed output size") from None
