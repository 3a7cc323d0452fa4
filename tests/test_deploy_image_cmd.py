"""Run the container image's own commands outside Docker.

There is no Docker engine here, so the Dockerfile's ENV, CMD and HEALTHCHECK are
read from the file and run as the container would run them. Three things differ:
the config is the offline example (no weights to download), the server listens on
127.0.0.1, and the port is a free one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .serverproc import REPO_ROOT, free_port

DOCKERFILE = REPO_ROOT / "Dockerfile"
OFFLINE_CONFIG = REPO_ROOT / "examples" / "offline.yaml"


def runtime_stage() -> str:
    text = DOCKERFILE.read_text()
    return text[text.rindex("\nFROM ") :]


def exec_form(instruction: str) -> list[str]:
    """Return the JSON array of the last ``instruction`` (CMD or HEALTHCHECK ... CMD)."""
    matches = re.findall(rf"^{instruction}.*?(\[.*\])\s*$", runtime_stage().replace("\\\n", " "), flags=re.MULTILINE)
    assert matches, f"no exec-form {instruction} in the runtime stage"
    return json.loads(matches[-1])


def image_env(tmp_path: Path) -> dict[str, str]:
    """The runtime stage's ENV values, with paths that exist only in the image replaced."""
    env = dict(os.environ)
    block = re.search(r"^ENV (.*?)(?=^\S)", runtime_stage(), flags=re.MULTILINE | re.DOTALL)
    for token in shlex.split(block.group(1).replace("\\\n", " ")):
        name, _, value = token.partition("=")
        env[name] = value
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env["TORCH_HOME"] = str(tmp_path / "torch")
    env["FXSERVE_CONFIG"] = str(OFFLINE_CONFIG)
    env["FXSERVE_SHUTDOWN_DELAY_S"] = "0.5"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def local_command(command: list[str], port: int) -> list[str]:
    """Point the image's command at the offline config, loopback and a free port."""
    replaced = []
    for argument in command:
        if argument == "/etc/fxserve/models.yaml":
            argument = str(OFFLINE_CONFIG)
        elif argument == "0.0.0.0":
            argument = "127.0.0.1"
        elif argument == "8000":
            argument = str(port)
        replaced.append(argument)
    return replaced


def test_image_cmd_serves_and_drains(tmp_path):
    port = free_port()
    command = local_command(exec_form("CMD"), port)
    log = (tmp_path / "cmd.log").open("wb")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=image_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and not ready:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.3)
        assert ready, (tmp_path / "cmd.log").read_text()

        healthcheck = [argument.replace("8000", str(port)) for argument in exec_form("HEALTHCHECK")]
        assert subprocess.run(healthcheck, env=image_env(tmp_path), timeout=30).returncode == 0

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def test_image_prefetch_command_runs(tmp_path):
    build_stage = DOCKERFILE.read_text()
    match = re.search(r"^RUN (python -m service prefetch .*)$", build_stage, flags=re.MULTILINE)
    assert match, "the build stage has no prefetch step"
    command = [str(OFFLINE_CONFIG) if part == "/etc/fxserve/models.yaml" else part for part in shlex.split(match.group(1))]
    command[0] = sys.executable

    result = subprocess.run(command, cwd=REPO_ROOT, env=image_env(tmp_path), capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "nothing to fetch" in result.stderr


@pytest.mark.parametrize("instruction", ["CMD", "HEALTHCHECK"])
def test_image_commands_use_exec_form(instruction):
    assert exec_form(instruction)[0] == "python"
