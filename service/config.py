"""models.yaml: its schema, loading, and start-up validation messages.

The schema is checked by pydantic; a failure becomes a ``ConfigError`` naming the
model, the field and the fix. Checks that need torchvision (does the architecture
exist, is the node in the graph) happen in ``loading.py`` and ``extractors.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from .errors import ConfigError, closest

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "PreprocessConfig",
    "TracerConfig",
    "ModelConfig",
    "ServiceConfig",
    "load_config",
    "resolve_config_path",
]

DEFAULT_CONFIG_PATH = "models.yaml"

DType = Literal["float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessConfig(_Strict):
    """Explicit preprocessing: resize, center crop, scale to [0, 1], normalise."""

    resize: int | tuple[int, int]
    crop: int | tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    antialias: bool = True

    @model_validator(mode="after")
    def _check_fixed_size(self) -> "PreprocessConfig":
        if self.crop is None and isinstance(self.resize, int):
            raise ValueError(
                "the output size must be fixed so images can be batched: "
                "set crop, or give resize as [height, width]"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("every std value must be positive")
        return self


class TracerConfig(_Strict):
    """Options for models that ``torch.fx`` cannot trace as they are."""

    leaf_modules: list[str] = Field(default_factory=list, description="import paths of nn.Module classes")
    autowrap_functions: list[str] = Field(default_factory=list, description="import paths of functions")
    concrete_args: dict[str, Any] | None = None


def _preprocess_kind(value: Any) -> str:
    return "preset" if isinstance(value, str) else "mapping"


# The input's type picks the branch, so a bad mapping reports its own error and not
# also "Input should be 'weights'" from the string branch.
_PreprocessField = Annotated[
    Annotated[Literal["weights"], Tag("preset")] | Annotated[PreprocessConfig, Tag("mapping")],
    Discriminator(_preprocess_kind),
]


class ModelConfig(_Strict):
    architecture: str
    weights: str | None
    layers: dict[str, str]
    default_layers: list[str] | None = None
    embed_layer: str | None = None
    preprocess: _PreprocessField = "weights"
    device: str = "auto"
    dtype: DType = "float32"
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    submodule: str | None = None
    tracer: TracerConfig | None = None
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    max_queue: int = Field(default=512, ge=1)
    extractor_cache_size: int = Field(default=8, ge=1, le=256)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_from_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {str(node): str(node) for node in value}
        return value

    @field_validator("layers")
    @classmethod
    def _layers_not_empty(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one layer is required")
        for name in value:
            if not name or "," in name:
                raise ValueError(f"layer name {name!r} must be non-empty and contain no comma")
        return value

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        if value == "auto" or value == "cpu" or value == "cuda" or value.startswith("cuda:") or value == "mps":
            return value
        raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N, mps")

    @model_validator(mode="after")
    def _check_layer_references(self) -> "ModelConfig":
        for field_name, names in (("default_layers", self.default_layers or []), ("embed_layer", [self.embed_layer] if self.embed_layer else [])):
            for name in names:
                if name not in self.layers:
                    raise ValueError(
                        f"{field_name} names layer {name!r}, which is not in layers "
                        f"(configured: {', '.join(self.layers)})"
                    )
        return self

    @property
    def resolved_default_layers(self) -> list[str]:
        return list(self.default_layers) if self.default_layers else [list(self.layers)[-1]]


class ServiceConfig(_Strict):
    models: dict[str, ModelConfig]

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        if not value:
            raise ValueError("at least one model is required")
        return value


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """Pick the config file: the argument, else ``$FXSERVE_CONFIG``, else ./models.yaml."""
    return Path(path or os.environ.get("FXSERVE_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike[str]) -> ServiceConfig:
    """Read and validate a models.yaml file; raise ConfigError with the model and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(None, None, f"cannot read {path}: {exc.strerror}", "Pass --config PATH or set FXSERVE_CONFIG") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(None, None, f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or "models" not in raw:
        raise ConfigError(None, "models", f"{path} has no top-level 'models' mapping", "See the README for the format")
    return parse_config(raw)


def parse_config(raw: dict[str, Any]) -> ServiceConfig:
    """Validate an already-parsed config mapping."""
    try:
        return ServiceConfig.model_validate(raw)
    except ValidationError as exc:
        raise _to_config_error(exc) from None


def _to_config_error(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    location = [str(part) for part in first["loc"]]
    if location[2:3] == ["preprocess"] and location[3:4] in (["preset"], ["mapping"]):
        del location[3]  # the union's branch tag is no field a user can write
    model = location[1] if len(location) > 1 and location[0] == "models" else None
    field = ".".join(location[2:] if model is not None else location) or None
    problem = first["msg"].removeprefix("Value error, ")
    fixes = []
    if first["type"] == "missing":
        problem = "this field is required"
    elif first["type"] == "extra_forbidden":
        problem = "unknown field"
        fixes.append(_valid_fields_hint(location))
    if len(exc.errors()) > 1:
        fixes.append(f"{len(exc.errors()) - 1} more problem(s) follow once this one is fixed")
    return ConfigError(model, field, problem, ". ".join(fixes))


def _valid_fields_hint(location: list[str]) -> str:
    """Suggest the closest valid name for the unknown field at ``location`` and list them all."""
    nested: dict[str, type[BaseModel]] = {"preprocess": PreprocessConfig, "tracer": TracerConfig}
    if location[0] != "models" or len(location) < 3:
        schema: type[BaseModel] = ServiceConfig
    elif len(location) == 4 and location[2] in nested:
        schema = nested[location[2]]
    else:
        schema = ModelConfig
    valid = list(schema.model_fields)
    suggestions = closest(location[-1], valid, limit=1)
    hint = f"Did you mean '{suggestions[0]}'? " if suggestions else ""
    return f"{hint}Valid fields: {', '.join(valid)}"
