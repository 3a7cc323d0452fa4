"""Every model in the shipped configs builds, traces and runs with random weights.

This is what start-up does, without downloading weights, so a wrong node name or an
untraceable layer in models.yaml fails here instead of in a deployed pod.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from service.config import ModelConfig, load_config
from service.extractors import ExtractorSet
from service.loading import load_model

from .serverproc import REPO_ROOT

SHIPPED_CONFIG_PATH = REPO_ROOT / "models.yaml"
OFFLINE_CONFIG_PATH = REPO_ROOT / "examples" / "offline.yaml"


def shipped_model_names() -> list[str]:
    """Read the model names without validating, so a bad entry fails its own test, not collection."""
    return list(yaml.safe_load(SHIPPED_CONFIG_PATH.read_text(encoding="utf-8"))["models"])


def build_and_warm_up(name: str, config: ModelConfig) -> ExtractorSet:
    """Build the model with random weights, check its nodes and run one zero image through it."""
    loaded = load_model(name, config, random_init=True)
    extractors = ExtractorSet(name, loaded.module, config.layers, config.tracer, 1)
    extractors.validate_nodes()
    height, width = loaded.preprocessor.output_size
    with torch.inference_mode():
        extractors.warm_up(torch.zeros(1, 3, height, width))
    return extractors


def assert_every_layer_has_shape(name: str, config: ModelConfig, extractors: ExtractorSet) -> None:
    for layer in config.layers:
        public = extractors.expand([layer])
        assert public, f"model {name}: layer {layer} produced no output"
        for public_name in public:
            shape = extractors.layers[public_name].shape
            assert shape, f"model {name}: layer {public_name} has an empty shape"
            assert all(size > 0 for size in shape), f"model {name}: layer {public_name} has shape {shape}"


@pytest.mark.parametrize("name", shipped_model_names())
def test_shipped_model_builds_and_runs(name):
    config = load_config(SHIPPED_CONFIG_PATH).models[name]
    extractors = build_and_warm_up(name, config)

    assert_every_layer_has_shape(name, config, extractors)
    assert extractors.expand(config.resolved_default_layers), f"model {name}: default_layers resolve to nothing"
    if config.embed_layer:
        assert extractors.expand([config.embed_layer]), f"model {name}: embed_layer resolves to nothing"


def test_offline_example_builds_and_runs():
    config = load_config(OFFLINE_CONFIG_PATH)

    assert config.models, f"{OFFLINE_CONFIG_PATH} configures no model"
    for name, model_config in config.models.items():
        assert model_config.weights is None, f"model {name}: the offline example must not need a download"
        extractors = build_and_warm_up(name, model_config)
        assert_every_layer_has_shape(name, model_config, extractors)
