"""Bearer-token authentication over real HTTP.

Two servers start together: one takes its keys from ``FXSERVE_API_KEYS``, one
from ``FXSERVE_API_KEYS_FILE``. The shared ``live_server`` has no keys and shows
that authentication is off by default.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from .serverproc import ServerProcess

ENV_KEYS = ["key-one", "key-two"]
FILE_KEYS = ["file-key-alpha", "file-key-beta"]
OPEN_PATHS = ["/healthz", "/readyz", "/metrics"]
MODEL = "small"

BASE_ENV = {"FXSERVE_TORCH_THREADS": "2", "FXSERVE_DECODE_WORKERS": "2", "FXSERVE_SHUTDOWN_DELAY_S": "0.1"}
CONFIG = {
    "models": {
        MODEL: {
            "architecture": "resnet18",
            "weights": None,
            "layers": {"pooled": "flatten"},
            "preprocess": {"resize": 64, "crop": 64},
        }
    }
}


@dataclass
class AuthServers:
    env_keys: ServerProcess
    file_keys: ServerProcess


@pytest.fixture(scope="module")
def auth_servers(tmp_path_factory) -> AuthServers:
    workdir = tmp_path_factory.mktemp("auth")
    keys_file = workdir / "api-keys.txt"
    # Surrounding whitespace and blank lines are allowed in the file.
    keys_file.write_text(f"{FILE_KEYS[0]}\n\n  {FILE_KEYS[1]}  \n")
    env_keys = ServerProcess(CONFIG, workdir, env={**BASE_ENV, "FXSERVE_API_KEYS": ",".join(ENV_KEYS)}, name="env-keys")
    file_keys = ServerProcess(CONFIG, workdir, env={**BASE_ENV, "FXSERVE_API_KEYS_FILE": str(keys_file)}, name="file-keys")
    env_keys.start()
    file_keys.start()
    try:
        env_keys.wait_ready()
        file_keys.wait_ready()
        yield AuthServers(env_keys, file_keys)
    finally:
        env_keys.stop()
        file_keys.stop()


def small_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def extract(base_url: str, headers: dict[str, str] | None = None, model: str = MODEL) -> httpx.Response:
    return httpx.post(
        f"{base_url}/extract",
        params={"model": model, "pool": "avg"},
        content=small_png(),
        headers={"Content-Type": "image/png", **(headers or {})},
        timeout=60,
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- keys from FXSERVE_API_KEYS -----------------------------------------------------


def test_auth_missing_header_gets_401(auth_servers):
    response = extract(auth_servers.env_keys.base_url)
    assert response.status_code == 401, response.text


def test_auth_missing_header_challenges_bearer(auth_servers):
    response = extract(auth_servers.env_keys.base_url)
    assert response.headers.get("www-authenticate") == "Bearer"


def test_auth_missing_header_json_error(auth_servers):
    response = extract(auth_servers.env_keys.base_url)
    assert response.json()["error"]["code"] == "unauthorized"


def test_auth_wrong_key_gets_401(auth_servers):
    response = extract(auth_servers.env_keys.base_url, bearer("key-three"))
    assert response.status_code == 401, response.text


def test_auth_key_prefix_gets_401(auth_servers):
    response = extract(auth_servers.env_keys.base_url, bearer(ENV_KEYS[0][:-1]))
    assert response.status_code == 401, response.text


def test_auth_other_scheme_gets_401(auth_servers):
    response = extract(auth_servers.env_keys.base_url, {"Authorization": f"Basic {ENV_KEYS[0]}"})
    assert response.status_code == 401, response.text


@pytest.mark.parametrize("key", ENV_KEYS)
def test_auth_env_key_accepted(auth_servers, key):
    response = extract(auth_servers.env_keys.base_url, bearer(key))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", OPEN_PATHS)
def test_auth_probe_paths_open(auth_servers, path):
    response = httpx.get(f"{auth_servers.env_keys.base_url}{path}", timeout=10)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/models", f"/models/{MODEL}", "/openapi.json"])
def test_auth_other_get_paths_closed(auth_servers, path):
    response = httpx.get(f"{auth_servers.env_keys.base_url}{path}", timeout=10)
    assert response.status_code == 401, response.text


def test_auth_models_with_key_accepted(auth_servers):
    response = httpx.get(f"{auth_servers.env_keys.base_url}/models", headers=bearer(ENV_KEYS[1]), timeout=10)
    assert response.status_code == 200, response.text


def test_auth_log_omits_keys(auth_servers):
    log = auth_servers.env_keys.log()
    for key in ENV_KEYS:
        assert key not in log


# --- keys from FXSERVE_API_KEYS_FILE ------------------------------------------------


@pytest.mark.parametrize("key", FILE_KEYS)
def test_auth_file_key_accepted(auth_servers, key):
    response = extract(auth_servers.file_keys.base_url, bearer(key))
    assert response.status_code == 200, response.text


def test_auth_file_missing_header_gets_401(auth_servers):
    response = extract(auth_servers.file_keys.base_url)
    assert response.status_code == 401, response.text


def test_auth_file_wrong_key_gets_401(auth_servers):
    response = extract(auth_servers.file_keys.base_url, bearer(ENV_KEYS[0]))
    assert response.status_code == 401, response.text


# --- no keys configured -----------------------------------------------------------------


def test_auth_off_without_keys(live_server):
    response = extract(live_server.base_url, model="resnet18")
    assert response.status_code == 200, response.text


def test_auth_off_models_without_keys(live_server):
    response = httpx.get(f"{live_server.base_url}/models", timeout=10)
    assert response.status_code == 200, response.text
