"""Faults over real HTTP: out-of-memory batches, a model that fails to load, a stalled worker.

``tests/fault_models.py`` supplies the faults: its model raises
``torch.OutOfMemoryError`` on batches of more than ``OOM_BATCH`` images and on any
batch with a plain white image, and sleeps ``HANG_S`` on a plain black image.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from .fault_models import faulty_config
from .imagefiles import noise_png, plain_png
from .serverproc import ServerProcess

MODEL = "faulty"
OOM_BATCH = 2
HANG_S = 3.0
STALL_TIMEOUT_S = 1
LAYERS = "layer1,pooled"
IMAGE_SEEDS = list(range(9))

BASE_ENV = {"FXSERVE_TORCH_THREADS": "2", "FXSERVE_DECODE_WORKERS": "2", "FXSERVE_SHUTDOWN_DELAY_S": "0.1"}


def post_images(base_url: str, images: list[bytes], model: str = MODEL, layers: str | None = LAYERS) -> httpx.Response:
    """POST on a connection of its own, so concurrent callers do not share one."""
    files = [("images", (f"image-{index}.png", data, "image/png")) for index, data in enumerate(images)]
    params = {"model": model}
    if layers:
        params["layers"] = layers
    with httpx.Client(base_url=base_url, timeout=60) as client:
        return client.post("/extract", params=params, files=files)


def decode_results(response: httpx.Response) -> list[dict[str, np.ndarray]]:
    results = []
    for result in response.json()["results"]:
        results.append({layer: np.asarray(entry["data"], dtype=entry["dtype"]).reshape(entry["shape"]) for layer, entry in result.items()})
    return results


def send_together(base_url: str, requests: list[list[bytes]]) -> list[httpx.Response]:
    """Send the requests at the same moment, so the batcher can put their images in one batch."""
    start = threading.Barrier(len(requests))

    def send(images: list[bytes]) -> httpx.Response:
        start.wait(timeout=30)
        return post_images(base_url, images)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, requests))


def assert_matches_reference(response: httpx.Response, seeds: list[int], references: dict[int, dict[str, np.ndarray]]) -> None:
    assert response.status_code == 200, response.text
    results = decode_results(response)
    assert len(results) == len(seeds)
    for seed, result in zip(seeds, results):
        for layer, expected in references[seed].items():
            # Batches of different sizes may pick different CPU kernels, so equality is up to rounding.
            np.testing.assert_allclose(result[layer], expected, rtol=1e-4, atol=1e-5, err_msg=f"image seed {seed}, layer {layer}")


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory) -> ServerProcess:
    model = faulty_config(max_batch=OOM_BATCH, hang_s=HANG_S)
    # A long batching window puts concurrent requests into batches larger than OOM_BATCH.
    model.update(max_batch_size=8, max_wait_ms=300)
    env = {**BASE_ENV, "FXSERVE_WORKER_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S)}
    server = ServerProcess({"models": {MODEL: model}}, tmp_path_factory.mktemp("faults"), env=env, name="faults")
    server.start().wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def references(fault_server) -> dict[int, dict[str, np.ndarray]]:
    """Fetch each image's outputs with a request of its own, because a batch of one image never runs out of memory."""
    outputs = {}
    for seed in IMAGE_SEEDS:
        response = post_images(fault_server.base_url, [noise_png(seed)])
        assert response.status_code == 200, response.text
        outputs[seed] = decode_results(response)[0]
    return outputs


# --- out of memory ------------------------------------------------------------


@dataclass
class SplitRun:
    seeds: list[list[int]]
    responses: list[httpx.Response]
    log: str


@pytest.fixture(scope="module")
def split_run(fault_server, references) -> SplitRun:
    seeds = [IMAGE_SEEDS[0:3], IMAGE_SEEDS[3:6], IMAGE_SEEDS[6:9]]
    responses = send_together(fault_server.base_url, [[noise_png(seed) for seed in group] for group in seeds])
    return SplitRun(seeds, responses, fault_server.log())


def test_oom_split_batches_ran_out_of_memory(split_run):
    # Proves the scenario: at least one batch was larger than the model can take.
    assert "out of memory on a batch of" in split_run.log


def test_oom_split_requests_match_single_image(split_run, references):
    for seeds, response in zip(split_run.seeds, split_run.responses):
        assert_matches_reference(response, seeds, references)


def test_oom_split_forward_passes_within_limit(split_run):
    for response in split_run.responses:
        sizes = [int(size) for size in response.headers["x-batch-sizes"].split(",")]
        assert max(sizes) <= OOM_BATCH, response.headers["x-batch-sizes"]


@dataclass
class WhiteRun:
    white: httpx.Response
    seeds: list[list[int]]
    others: list[httpx.Response]


@pytest.fixture(scope="module")
def white_run(fault_server, references, split_run) -> WhiteRun:
    """Send a white image, which runs out of memory even alone, together with three good requests."""
    seeds = [IMAGE_SEEDS[0:2], IMAGE_SEEDS[2:4], IMAGE_SEEDS[4:6]]
    requests = [[plain_png(255)]] + [[noise_png(seed) for seed in group] for group in seeds]
    responses = send_together(fault_server.base_url, requests)
    return WhiteRun(responses[0], seeds, responses[1:])


def test_oom_white_image_gets_507(white_run):
    assert white_run.white.status_code == 507, white_run.white.text


def test_oom_white_image_error_code(white_run):
    assert white_run.white.json()["error"]["code"] == "out_of_memory"


def test_oom_white_image_message_explains(white_run):
    message = white_run.white.json()["error"]["message"]
    assert "out of device memory" in message, message
    assert f"'{MODEL}'" in message, message


def test_oom_white_image_spares_other_requests(white_run, references):
    for seeds, response in zip(white_run.seeds, white_run.others):
        assert_matches_reference(response, seeds, references)


# --- stalled worker ------------------------------------------------------------


@dataclass
class StallRun:
    during: httpx.Response | None
    request: httpx.Response
    after: httpx.Response | None


def poll_healthz(base_url: str, status: int, timeout_s: float) -> httpx.Response | None:
    """Return the first /healthz response with ``status``, or None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = httpx.get(f"{base_url}/healthz", timeout=10)
        if response.status_code == status:
            return response
        time.sleep(0.1)
    return None


@pytest.fixture(scope="module")
def stall_run(fault_server, white_run) -> StallRun:
    """Keep the worker busy with a black image for ``HANG_S``, longer than the stall timeout ``STALL_TIMEOUT_S``."""
    with ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(post_images, fault_server.base_url, [plain_png(0)])
        during = poll_healthz(fault_server.base_url, 503, timeout_s=HANG_S + 10)
        request = hanging.result()
    after = poll_healthz(fault_server.base_url, 200, timeout_s=10)
    return StallRun(during, request, after)


def test_stall_healthz_fails_during_hang(stall_run):
    assert stall_run.during is not None, "/healthz never returned 503 while the worker hung"


def test_stall_healthz_names_model(stall_run):
    assert stall_run.during is not None
    assert MODEL in stall_run.during.json()["reason"], stall_run.during.text


def test_stall_request_still_answered(stall_run):
    assert stall_run.request.status_code == 200, stall_run.request.text


def test_stall_healthz_recovers_after_hang(stall_run):
    assert stall_run.after is not None, "/healthz did not return 200 after the hang ended"


# --- a model that fails to load -------------------------------------------------


def resnet18_entry(weights: str | None) -> dict:
    return {
        "architecture": "resnet18",
        "weights": weights,
        "layers": {"pooled": "flatten"},
        "preprocess": {"resize": 64, "crop": 64},
    }


@dataclass
class FailedModelServers:
    strict_exit_code: int
    strict_log: str
    tolerant: ServerProcess
    missing_path: Path


@pytest.fixture(scope="module")
def failed_model_servers(tmp_path_factory) -> FailedModelServers:
    """Serve a good model and one whose checkpoint file is missing, once by default and once tolerant."""
    workdir = tmp_path_factory.mktemp("failed_model")
    missing = workdir / "missing-checkpoint.pt"
    config = {"models": {"good": resnet18_entry(None), "broken": resnet18_entry(str(missing))}}
    strict = ServerProcess(config, workdir, env=BASE_ENV, name="strict")
    tolerant = ServerProcess(config, workdir, env={**BASE_ENV, "FXSERVE_ALLOW_FAILED_MODELS": "true"}, name="tolerant")
    strict.start()
    tolerant.start()
    try:
        tolerant.wait_ready()
        strict_exit_code = strict.wait_exit(timeout_s=180)
        yield FailedModelServers(strict_exit_code, strict.log(), tolerant, missing)
    finally:
        strict.stop()
        tolerant.stop()


def test_failed_model_stops_server_by_default(failed_model_servers):
    assert failed_model_servers.strict_exit_code != 0, failed_model_servers.strict_log


def test_failed_model_log_names_model_and_reason(failed_model_servers):
    log = failed_model_servers.strict_log
    failure_lines = [line for line in log.splitlines() if "broken" in line and "failed to load" in line]
    assert failure_lines, log
    assert str(failed_model_servers.missing_path) in failure_lines[0]
    assert "does not exist" in failure_lines[0]


def test_failed_model_allowed_readyz_200(failed_model_servers):
    response = httpx.get(f"{failed_model_servers.tolerant.base_url}/readyz", timeout=10)
    assert response.status_code == 200, response.text


def test_failed_model_allowed_readyz_degraded(failed_model_servers):
    body = httpx.get(f"{failed_model_servers.tolerant.base_url}/readyz", timeout=10).json()
    assert body["status"] == "degraded"
    assert body["models"] == {"good": "ready", "broken": "failed"}
    assert "broken" in body["failed"]


def test_failed_model_listed_with_error(failed_model_servers):
    models = httpx.get(f"{failed_model_servers.tolerant.base_url}/models", timeout=10).json()["models"]
    broken = next(model for model in models if model["name"] == "broken")
    assert broken["status"] == "failed"
    assert "does not exist" in broken["error"]


def test_failed_model_requests_get_503(failed_model_servers):
    response = post_images(failed_model_servers.tolerant.base_url, [noise_png(0)], model="broken", layers=None)
    assert response.status_code == 503, response.text
    assert "failed to load" in response.json()["error"]["message"]


def test_failed_model_good_model_serves(failed_model_servers):
    response = post_images(failed_model_servers.tolerant.base_url, [noise_png(0)], model="good", layers=None)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["pooled"]["shape"] == [512]


def test_failed_model_healthz_stays_200(failed_model_servers):
    response = httpx.get(f"{failed_model_servers.tolerant.base_url}/healthz", timeout=10)
    assert response.status_code == 200, response.text
