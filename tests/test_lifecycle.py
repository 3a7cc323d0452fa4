"""Graceful shutdown over real HTTP: SIGTERM in the middle of a burst loses no accepted request.

One server runs the whole scenario once (the module fixture ``drain_run``) and
each test checks one observation of it. The model sleeps ``BATCH_DELAY_S`` on
every batch of at most four images, so the burst still has work queued when the
listener closes ``SHUTDOWN_DELAY_S`` after the signal.
"""

from __future__ import annotations

import io
import signal
import socket
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from .fault_models import faulty_config
from .serverproc import ServerProcess

SHUTDOWN_DELAY_S = 1.0
BATCH_DELAY_S = 0.3
BURST_REQUESTS = 20
WAVE_REQUESTS = 4
POOLED_SHAPE = [512]


@dataclass
class Outcome:
    """One request of the scenario: its image count and the response or transport error."""

    image_count: int
    response: httpx.Response | None
    error: httpx.TransportError | None
    finished_at: float


@dataclass
class DrainRun:
    metrics_ready: str
    readyz_draining: httpx.Response
    healthz_draining: httpx.Response
    metrics_draining: str
    burst: list[Outcome]
    wave: list[Outcome]
    listener_closed_at: float | None
    exit_code: int
    log: str


def noise_png(seed: int, size: int = 80) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def send_extract(base_url: str, image_count: int, seed: int) -> Outcome:
    """POST ``image_count`` images on a connection of its own; transport errors are returned, not raised."""
    files = [("images", (f"{seed}-{index}.png", noise_png(seed * 10 + index), "image/png")) for index in range(image_count)]
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            response = client.post("/extract", files=files)
    except httpx.TransportError as exc:
        return Outcome(image_count, None, exc, time.monotonic())
    return Outcome(image_count, response, None, time.monotonic())


def wait_for_refused_connection(port: int, timeout_s: float) -> float | None:
    """Return the monotonic time at which connecting to ``port`` was first refused, or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            probe = socket.create_connection(("127.0.0.1", port), timeout=1)
        except ConnectionRefusedError:
            return time.monotonic()
        probe.close()
        time.sleep(0.05)
    return None


def lifecycle_value(metrics_text: str, state: str) -> float | None:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "fxserve_lifecycle_state" and sample.labels.get("state") == state:
                return sample.value
    return None


@pytest.fixture(scope="module")
def drain_run(tmp_path_factory) -> DrainRun:
    model = faulty_config(max_batch=64, delay_s=BATCH_DELAY_S)
    model["max_batch_size"] = 4
    model["max_wait_ms"] = 10
    env = {
        "FXSERVE_TORCH_THREADS": "2",
        "FXSERVE_DECODE_WORKERS": "2",
        "FXSERVE_SHUTDOWN_DELAY_S": str(SHUTDOWN_DELAY_S),
    }
    server = ServerProcess({"models": {"slow": model}}, tmp_path_factory.mktemp("drain"), env=env, name="drain")
    server.start().wait_ready()
    try:
        metrics_ready = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        with ThreadPoolExecutor(BURST_REQUESTS + WAVE_REQUESTS) as pool:
            # Every fourth request carries two images, to check that multi-image responses stay whole.
            burst = [pool.submit(send_extract, server.base_url, 2 if number % 4 == 0 else 1, number) for number in range(BURST_REQUESTS)]
            wait(burst, timeout=60, return_when=FIRST_COMPLETED)
            server.send_signal(signal.SIGTERM)

            # The listener stays open for SHUTDOWN_DELAY_S, so probes and new requests still reach the server.
            readyz = httpx.get(f"{server.base_url}/readyz", timeout=10)
            healthz = httpx.get(f"{server.base_url}/healthz", timeout=10)
            metrics_draining = httpx.get(f"{server.base_url}/metrics", timeout=10).text
            wave = [pool.submit(send_extract, server.base_url, 1, 100 + number) for number in range(WAVE_REQUESTS)]

            listener_closed_at = wait_for_refused_connection(server.port, timeout_s=30)
            burst_outcomes = [future.result() for future in burst]
            wave_outcomes = [future.result() for future in wave]
        exit_code = server.wait_exit(timeout_s=60)
    finally:
        server.stop()
    return DrainRun(
        metrics_ready=metrics_ready,
        readyz_draining=readyz,
        healthz_draining=healthz,
        metrics_draining=metrics_draining,
        burst=burst_outcomes,
        wave=wave_outcomes,
        listener_closed_at=listener_closed_at,
        exit_code=exit_code,
        log=server.log(),
    )


def assert_complete_answer(outcome: Outcome, log: str) -> None:
    assert outcome.error is None, f"{outcome.error!r}\n{log}"
    assert outcome.response.status_code == 200, outcome.response.text
    results = outcome.response.json()["results"]
    assert len(results) == outcome.image_count
    for result in results:
        assert result["pooled"]["shape"] == POOLED_SHAPE


def test_lifecycle_metric_ready_is_one(drain_run):
    assert lifecycle_value(drain_run.metrics_ready, "ready") == 1


def test_lifecycle_metric_loading_is_zero_when_ready(drain_run):
    assert lifecycle_value(drain_run.metrics_ready, "loading") == 0


def test_lifecycle_metric_draining_after_sigterm(drain_run):
    assert lifecycle_value(drain_run.metrics_draining, "draining") == 1


def test_lifecycle_metric_ready_off_after_sigterm(drain_run):
    assert lifecycle_value(drain_run.metrics_draining, "ready") == 0


def test_sigterm_readyz_returns_503(drain_run):
    assert drain_run.readyz_draining.status_code == 503, drain_run.readyz_draining.text


def test_sigterm_readyz_state_draining(drain_run):
    assert drain_run.readyz_draining.json()["state"] == "draining"


def test_sigterm_healthz_stays_200(drain_run):
    assert drain_run.healthz_draining.status_code == 200, drain_run.healthz_draining.text


def test_sigterm_burst_requests_all_answered(drain_run):
    for outcome in drain_run.burst:
        assert_complete_answer(outcome, drain_run.log)


def test_sigterm_requests_during_delay_answered(drain_run):
    # A request that reaches the port only after the listener closed fails to
    # connect. The server never accepted it, so it is not lost.
    accepted = [outcome for outcome in drain_run.wave if not isinstance(outcome.error, httpx.ConnectError)]
    assert accepted, "every request sent during the shutdown delay failed to connect"
    for outcome in accepted:
        assert_complete_answer(outcome, drain_run.log)


def test_sigterm_listener_closes(drain_run):
    assert drain_run.listener_closed_at is not None, drain_run.log


def test_sigterm_drain_outlives_listener(drain_run):
    # Proves the scenario tested the drain: requests were still running when
    # new connections were already refused, and they finished anyway.
    last_finished = max(outcome.finished_at for outcome in drain_run.burst + drain_run.wave)
    assert drain_run.listener_closed_at is not None
    assert last_finished > drain_run.listener_closed_at


def test_sigterm_exit_code_zero(drain_run):
    assert drain_run.exit_code == 0, drain_run.log


def test_sigterm_log_shows_draining(drain_run):
    assert "draining: readiness is off" in drain_run.log


def test_sigterm_log_shows_stopped(drain_run):
    assert "service.engine: stopped" in drain_run.log


def test_sigterm_log_has_no_errors(drain_run):
    error_lines = [line for line in drain_run.log.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert error_lines == []
