"""The command line, run as a user runs it: ``python -m service`` and ``fxserve``.

Each run starts a Python process that imports torch (a few seconds), so every
test makes exactly one run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.models.feature_extraction import get_graph_node_names

from .conftest import resnet18_state_dict
from .reference import MOBILENET_PREPROCESS
from .serverproc import REPO_ROOT

CLI_TIMEOUT_S = 120


def run_cli(arguments: list[str], torch_home: Path, command: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI with ``torch_home`` as TORCH_HOME and no FXSERVE_CONFIG from the outer environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TORCH_HOME": str(torch_home)}
    env.pop("FXSERVE_CONFIG", None)
    command = command or [sys.executable, "-m", "service"]
    return subprocess.run([*command, *arguments], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)


def write_config(path: Path, models: dict) -> Path:
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


@pytest.fixture()
def empty_torch_home(tmp_path) -> Path:
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    return home


def test_nodes_matches_torchvision(empty_torch_home):
    result = run_cli(["nodes", "resnet18"], empty_torch_home)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == get_graph_node_names(resnet18())[1]


def test_check_valid_config_exits_zero(tmp_path, empty_torch_home):
    config = write_config(tmp_path / "models.yaml", {
        "resnet18": {"architecture": "resnet18", "weights": "IMAGENET1K_V1", "layers": {"stage1": "layer1", "pooled": "flatten"}},
        "mobilenet": {"architecture": "mobilenet_v3_small", "weights": None, "layers": ["features.3", "flatten"], "preprocess": MOBILENET_PREPROCESS},
    })
    result = run_cli(["check", "--config", str(config)], empty_torch_home)

    assert result.returncode == 0, result.stderr
    assert "model resnet18: OK" in result.stderr
    assert "model mobilenet: OK" in result.stderr
    assert "all 2 models are valid" in result.stderr
    assert "weights NOT cached" in result.stderr, "check should say that resnet18's weights must be fetched"


def test_check_unknown_node_exits_nonzero(tmp_path, empty_torch_home):
    config = write_config(tmp_path / "models.yaml", {
        "good": {"architecture": "resnet18", "weights": None, "layers": ["layer1"], "preprocess": {"resize": [224, 224]}},
        "bad": {"architecture": "resnet18", "weights": None, "layers": {"deep": "layer4.1.conv3"}, "preprocess": {"resize": [224, 224]}},
    })
    result = run_cli(["check", "--config", str(config)], empty_torch_home)

    assert result.returncode != 0
    assert "model 'bad', field 'layers.deep'" in result.stderr
    assert "'layer4.1.conv3' is not in the graph" in result.stderr
    assert "model good: OK" in result.stderr
    assert "1 of 2 models have errors" in result.stderr


def test_prefetch_hash_mismatch_exits_one(empty_torch_home):
    file_name = os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    cached = empty_torch_home / "hub" / "checkpoints" / file_name
    # A random state dict cannot have the SHA-256 prefix that the file name carries.
    torch.save(resnet18_state_dict(), cached)
    config = write_config(empty_torch_home.parent / "models.yaml", {
        "resnet18": {"architecture": "resnet18", "weights": "IMAGENET1K_V1", "layers": ["flatten"]},
    })
    result = run_cli(["prefetch", "--config", str(config)], empty_torch_home)

    assert result.returncode == 1, result.stderr
    assert str(cached) in result.stderr
    assert "SHA-256" in result.stderr
    assert "f37072fd" in result.stderr, "the message should show the expected hash prefix"
    assert cached.exists(), "prefetch must not delete the file on its own"


def test_prefetch_checkpoint_path_exits_zero(tmp_path, empty_torch_home):
    checkpoint = tmp_path / "resnet18.pth"
    torch.save({"state_dict": resnet18_state_dict()}, checkpoint)
    config = write_config(tmp_path / "models.yaml", {
        "resnet18": {"architecture": "resnet18", "weights": str(checkpoint), "layers": ["flatten"], "preprocess": {"resize": [224, 224]}},
    })
    result = run_cli(["prefetch", "--config", str(config)], empty_torch_home)

    assert result.returncode == 0, result.stderr
    assert f"checkpoint {checkpoint} loads" in result.stderr


def test_console_script_help(empty_torch_home):
    script = Path(sys.executable).parent / "fxserve"
    assert script.is_file(), f"{script} is missing; install the project with pip install -e ."

    result = run_cli(["--help"], empty_torch_home, command=[str(script)])

    assert result.returncode == 0, result.stderr
    assert "{serve,check,nodes,prefetch}" in result.stdout


def test_serve_busy_port_exits_one(tmp_path, empty_torch_home):
    config = write_config(tmp_path / "models.yaml", {
        "mobilenet": {"architecture": "mobilenet_v3_small", "weights": None, "layers": ["flatten"], "preprocess": MOBILENET_PREPROCESS},
    })
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)], empty_torch_home)

    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1 port {port}" in result.stderr
    assert "terminate called" not in result.stderr


def test_serve_empty_api_key_file_refuses_to_start(tmp_path, empty_torch_home):
    keys = tmp_path / "keys.txt"
    keys.write_text("# no keys yet\n\n")
    config = write_config(tmp_path / "models.yaml", {
        "mobilenet": {"architecture": "mobilenet_v3_small", "weights": None, "layers": ["flatten"], "preprocess": MOBILENET_PREPROCESS},
    })
    env_keys = {"FXSERVE_API_KEYS_FILE": str(keys)}
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--config", str(config), "--port", "0"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TORCH_HOME": str(empty_torch_home), **env_keys},
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
    )

    assert result.returncode == 2, result.stderr
    assert "contains no key" in result.stderr


def test_check_corrupt_cached_weights_fails(tmp_path, empty_torch_home):
    cached = empty_torch_home / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    cached.write_bytes(b"not a checkpoint")
    config = write_config(tmp_path / "models.yaml", {
        "resnet18": {"architecture": "resnet18", "weights": "IMAGENET1K_V1", "layers": ["flatten"]},
    })

    result = run_cli(["check", "--config", str(config)], empty_torch_home)

    assert result.returncode == 1, result.stderr
    assert "does not match the SHA-256 prefix" in result.stderr


def test_check_missing_config_names_path(tmp_path, empty_torch_home):
    missing = tmp_path / "absent.yaml"

    result = run_cli(["check", "--config", str(missing)], empty_torch_home)

    assert result.returncode == 2
    assert f"{missing}: cannot read {missing}" in result.stderr
    assert "models.yaml" not in result.stderr.replace(str(missing), "")


def test_nodes_submodule_of_detection_model(empty_torch_home):
    result = run_cli(["nodes", "fasterrcnn_mobilenet_v3_large_320_fpn", "--submodule", "backbone"], empty_torch_home)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "fpn"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so device: cuda is valid here")
def test_check_cuda_without_gpu_fails(tmp_path, empty_torch_home):
    config = write_config(tmp_path / "models.yaml", {
        "mobilenet": {"architecture": "mobilenet_v3_small", "weights": None, "layers": ["flatten"], "preprocess": MOBILENET_PREPROCESS, "device": "cuda"},
    })

    result = run_cli(["check", "--config", str(config)], empty_torch_home)

    assert result.returncode == 1, result.stderr
    assert "CUDA is not available" in result.stderr


def test_bind_socket_lets_asyncio_disable_nagle():
    # asyncio sets TCP_NODELAY on accepted connections only when the listening
    # socket's proto is IPPROTO_TCP; without it each response waits ~40 ms for an ACK.
    from service.cli import _bind

    listener = _bind("127.0.0.1", 0)
    try:
        assert listener.proto == socket.IPPROTO_TCP
        assert listener.getsockname()[0] == "127.0.0.1"
    finally:
        listener.close()
