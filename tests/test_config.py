"""models.yaml validation: every error names the model, the field and the fix.

Schema errors come from ``parse_config``. Errors that need torchvision (the
architecture, the weights, the graph nodes, the checkpoint keys) come from
``load_model`` and ``ExtractorSet.validate_nodes``, which is what start-up and
``python -m service check`` run.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
import yaml
from torchvision.models import ResNet18_Weights, resnet18

from service.config import ModelConfig, load_config, parse_config, resolve_config_path
from service.errors import CheckpointMismatchError, ConfigError
from service.extractors import ExtractorSet
from service.loading import load_model

from .conftest import SERVER_ENV, mobilenet_state_dict, resnet18_state_dict
from .reference import MOBILENET_PREPROCESS
from .serverproc import ServerProcess, free_port

FIXED_PREPROCESS = {"resize": [224, 224]}


def resnet18_entry(**overrides) -> dict:
    """A valid resnet18 entry with random weights; ``overrides`` replace or add fields."""
    entry = {"architecture": "resnet18", "weights": None, "layers": {"pooled": "flatten"}, "preprocess": FIXED_PREPROCESS}
    entry.update(overrides)
    return entry


def parse_model(name: str, entry: dict) -> ModelConfig:
    return parse_config({"models": {name: entry}}).models[name]


def schema_error(name: str, entry: dict) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_model(name, entry)
    return caught.value


def load_error(name: str, entry: dict, *, random_init: bool = True) -> ConfigError:
    config = parse_model(name, entry)
    with pytest.raises(ConfigError) as caught:
        load_model(name, config, random_init=random_init)
    return caught.value


# --- schema ---------------------------------------------------------------


def test_config_missing_architecture_names_field():
    entry = resnet18_entry()
    del entry["architecture"]
    error = schema_error("encoder", entry)

    assert error.model == "encoder"
    assert error.field == "architecture"
    assert "model 'encoder'" in error.message
    assert "field 'architecture'" in error.message
    assert "required" in error.message


def test_config_unknown_field_suggests_valid_one():
    error = schema_error("encoder", resnet18_entry(layer=["layer1"]))

    assert error.model == "encoder"
    assert error.field == "layer"
    assert "unknown field" in error.message
    assert "Did you mean 'layers'" in error.message
    assert "default_layers" in error.message, "the message should list the valid fields"


def test_config_unknown_preprocess_field_names_nested_field():
    error = schema_error("encoder", resnet18_entry(preprocess={"resize": 256, "crop": 224, "means": [0.5, 0.5, 0.5]}))

    assert error.field == "preprocess.means"
    assert "Did you mean 'mean'" in error.message


def test_config_unknown_top_level_field():
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": {"encoder": resnet18_entry()}, "modles": {}})

    assert caught.value.model is None
    assert caught.value.field == "modles"
    assert "Did you mean 'models'" in caught.value.message


def test_config_default_layers_outside_layers():
    error = schema_error("encoder", resnet18_entry(layers={"stage1": "layer1"}, default_layers=["stage4"]))

    assert error.model == "encoder"
    assert "default_layers" in error.message
    assert "'stage4'" in error.message
    assert "configured: stage1" in error.message


def test_config_embed_layer_outside_layers():
    error = schema_error("encoder", resnet18_entry(layers={"stage1": "layer1"}, embed_layer="pooled"))

    assert "embed_layer" in error.message
    assert "'pooled'" in error.message


def test_config_preprocess_without_fixed_size():
    error = schema_error("encoder", resnet18_entry(preprocess={"resize": 256}))

    assert error.model == "encoder"
    assert error.field == "preprocess"
    assert "fixed" in error.message
    assert "set crop, or give resize as [height, width]" in error.message


def test_config_preprocess_misspelled_preset():
    error = schema_error("encoder", resnet18_entry(preprocess="weight"))

    assert error.field == "preprocess"
    assert "'weights'" in error.message


def test_config_layer_list_uses_node_as_name():
    config = parse_model("encoder", resnet18_entry(layers=["layer1", "layer4.1.relu_1", "flatten"]))

    assert config.layers == {"layer1": "layer1", "layer4.1.relu_1": "layer4.1.relu_1", "flatten": "flatten"}


def test_config_default_layers_fall_back_to_last_layer():
    config = parse_model("encoder", resnet18_entry(layers={"stage1": "layer1", "stage4": "layer4"}))

    assert config.resolved_default_layers == ["stage4"]


def test_config_path_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "chosen.yaml"
    path.write_text(yaml.safe_dump({"models": {"chosen": resnet18_entry()}}))
    monkeypatch.setenv("FXSERVE_CONFIG", str(path))

    assert resolve_config_path(None) == path
    assert list(load_config(resolve_config_path(None)).models) == ["chosen"]


def test_config_path_argument_overrides_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSERVE_CONFIG", str(tmp_path / "from_env.yaml"))

    assert resolve_config_path(tmp_path / "argument.yaml") == tmp_path / "argument.yaml"


def test_config_missing_file_names_fix(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")

    assert "absent.yaml" in caught.value.message
    assert "FXSERVE_CONFIG" in caught.value.message


# --- architecture and weights ---------------------------------------------


def test_load_model_unknown_architecture_suggests_close_names():
    error = load_error("encoder", resnet18_entry(architecture="resnet5"))

    assert error.model == "encoder"
    assert error.field == "architecture"
    assert "'resnet5' is not a torchvision model" in error.message
    assert "Did you mean" in error.message
    assert "resnet50" in error.message


def test_load_model_unknown_weights_member_lists_members():
    error = load_error("encoder", resnet18_entry(weights="IMAGENET1K_V9", preprocess="weights"))

    assert error.model == "encoder"
    assert error.field == "weights"
    assert "'IMAGENET1K_V9'" in error.message
    assert "ResNet18_Weights" in error.message
    assert "IMAGENET1K_V1" in error.message, "the message should list the valid members"


def test_load_model_missing_checkpoint_file(tmp_path):
    missing = tmp_path / "absent" / "resnet18.pth"
    error = load_error("encoder", resnet18_entry(weights=str(missing)))

    assert error.model == "encoder"
    assert error.field == "weights"
    assert str(missing) in error.message
    assert "does not exist" in error.message


def test_load_model_preprocess_weights_needs_enum():
    error = load_error("encoder", resnet18_entry(weights=None, preprocess="weights"))

    assert error.model == "encoder"
    assert error.field == "preprocess"
    assert "weights enum member" in error.message
    assert "resize" in error.message, "the fix should show a preprocess mapping"


def test_load_model_null_weights_warns(caplog):
    config = parse_model("encoder", resnet18_entry())
    with caplog.at_level(logging.WARNING, logger="service.loading"):
        loaded = load_model("encoder", config)

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert loaded.random_weights
    assert len(warnings) == 1
    assert "encoder" in warnings[0].getMessage()
    assert "RANDOM weights" in warnings[0].getMessage()


# --- graph nodes ----------------------------------------------------------


def test_validate_nodes_unknown_node_lists_closest():
    config = parse_model("encoder", resnet18_entry(layers={"deep": "layer4.1.conv3"}))
    loaded = load_model("encoder", config, random_init=True)
    extractors = ExtractorSet("encoder", loaded.module, config.layers, config.tracer, 1)

    with pytest.raises(ConfigError) as caught:
        extractors.validate_nodes()

    assert caught.value.model == "encoder"
    assert caught.value.field == "layers.deep"
    assert "'layer4.1.conv3' is not in the graph" in caught.value.message
    assert "layer4.1.conv2" in caught.value.message
    assert "layer4.1.conv1" in caught.value.message


# --- checkpoints ----------------------------------------------------------


def test_checkpoint_wrong_architecture_names_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    entry = {"architecture": "mobilenet_v3_small", "weights": str(path), "layers": ["flatten"], "preprocess": MOBILENET_PREPROCESS}
    error = load_error("mobile", entry, random_init=False)

    assert isinstance(error, CheckpointMismatchError)
    assert error.model == "mobile"
    assert error.field == "weights"
    assert "missing keys [features.0.0.weight" in error.message
    assert "unexpected keys [conv1.weight" in error.message


def test_checkpoint_wrong_shapes_names_key(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    error = load_error("classifier", resnet18_entry(weights=str(path), kwargs={"num_classes": 10}), random_init=False)

    assert isinstance(error, CheckpointMismatchError)
    assert error.model == "classifier"
    assert error.field == "weights"
    assert "fc.weight" in error.message


def test_checkpoint_wrapper_and_prefix_loads(mobilenet_checkpoint):
    entry = {"architecture": "mobilenet_v3_small", "weights": str(mobilenet_checkpoint), "layers": ["flatten"], "preprocess": MOBILENET_PREPROCESS}
    loaded = load_model("mobile", parse_model("mobile", entry))

    expected = mobilenet_state_dict()
    served = loaded.module.state_dict()
    assert set(served) == set(expected)
    for key, value in expected.items():
        assert torch.equal(served[key], value), key
    assert not loaded.random_weights


def test_checkpoint_not_a_state_dict(tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save([1, 2, 3], path)
    error = load_error("encoder", resnet18_entry(weights=str(path)), random_init=False)

    assert error.field == "weights"
    assert "not a state dict" in error.message


# --- start-up -------------------------------------------------------------


@pytest.mark.slow
def test_serve_uncached_weights_offline_names_file(tmp_path):
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    config = {"models": {"resnet18": resnet18_entry(weights="IMAGENET1K_V1", preprocess="weights")}}
    # A proxy on a closed local port makes the download fail at once even where
    # the internet is reachable.
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = {**SERVER_ENV, "TORCH_HOME": str(torch_home), "HTTPS_PROXY": dead_proxy, "https_proxy": dead_proxy}
    server = ServerProcess(config, tmp_path / "server", env=env, name="offline").start()
    try:
        returncode = server.wait_exit(timeout_s=120)
    finally:
        server.stop()
    log = server.log()

    file_name = os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    assert returncode != 0, log
    assert file_name in log
    assert str(torch_home / "hub" / "checkpoints") in log
    assert not (torch_home / "hub" / "checkpoints" / file_name).exists()


def test_load_model_cached_enum_weights(tmp_path, monkeypatch):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(resnet18_state_dict(), checkpoints / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    loaded = load_model("encoder", parse_model("encoder", resnet18_entry(weights="IMAGENET1K_V1", preprocess="weights")))

    assert loaded.weights_description == "ResNet18_Weights.IMAGENET1K_V1"
    assert torch.equal(loaded.module.state_dict()["conv1.weight"], resnet18_state_dict()["conv1.weight"])
    assert loaded.preprocessor.crop == (224,)
    assert loaded.preprocessor.resize == (256,)
