"""Start-up and client disconnects, observed from outside over HTTP."""

from __future__ import annotations

import io
import signal
import threading
import time

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from .fault_models import faulty_config
from .serverproc import ServerProcess


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), color).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_listening(base_url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base_url}/healthz", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError("the server never started listening")


def test_startup_readyz_503_while_loading(tmp_path):
    config = {"models": {"slow": faulty_config(build_delay_s=4.0)}}
    server = ServerProcess(config, tmp_path, env={"FXSERVE_SHUTDOWN_DELAY_S": "0.2"}, name="slow").start()
    try:
        wait_listening(server.base_url)
        readyz = httpx.get(f"{server.base_url}/readyz")
        healthz = httpx.get(f"{server.base_url}/healthz")
        extract = httpx.post(f"{server.base_url}/extract", content=png_bytes((10, 200, 30)), headers={"Content-Type": "image/png"})
        metrics = httpx.get(f"{server.base_url}/metrics").text

        assert readyz.status_code == 503
        assert readyz.json()["state"] == "loading"
        assert readyz.json()["models"] == {"slow": "loading"}
        assert healthz.status_code == 200
        assert extract.status_code == 503
        assert "still loading" in extract.json()["error"]["message"]
        assert metric_value(metrics, "fxserve_ready") == 0
        assert metric_value(metrics, "fxserve_lifecycle_state", state="loading") == 1

        server.wait_ready(timeout_s=120)
        assert httpx.get(f"{server.base_url}/readyz").json()["state"] == "ready"
    finally:
        server.stop()


@pytest.fixture()
def stalled_server(tmp_path):
    # A black image makes the worker sleep 3 s, so later requests wait in the queue.
    config = {"models": {"faulty": faulty_config(hang_s=3.0)}}
    server = ServerProcess(config, tmp_path, env={"FXSERVE_SHUTDOWN_DELAY_S": "0.2"}, name="stall").start().wait_ready()
    yield server
    server.stop()


def test_disconnect_dropped_before_forward(stalled_server):
    base_url = stalled_server.base_url
    blocker = threading.Thread(
        target=httpx.post,
        args=(f"{base_url}/extract",),
        kwargs={"content": png_bytes((0, 0, 0)), "headers": {"Content-Type": "image/png"}, "timeout": 30},
    )
    blocker.start()
    time.sleep(0.5)
    images_before = metric_value(httpx.get(f"{base_url}/metrics").text, "fxserve_images_total", model="faulty")

    # This client gives up while its image waits behind the stalled batch.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/extract", content=png_bytes((10, 200, 30)), headers={"Content-Type": "image/png"}, timeout=0.5)
    blocker.join(timeout=30)
    time.sleep(0.5)
    metrics = httpx.get(f"{base_url}/metrics").text

    assert metric_value(metrics, "fxserve_rejected_requests_total", model="faulty", reason="client_disconnected") == 1
    assert metric_value(metrics, "fxserve_images_total", model="faulty") == images_before + 1, "only the blocking image ran"


def test_second_signal_skips_delay_and_exits_zero(tmp_path):
    config = {"models": {"faulty": faulty_config()}}
    server = ServerProcess(config, tmp_path, env={"FXSERVE_SHUTDOWN_DELAY_S": "30"}, name="twice").start().wait_ready()
    try:
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = server.wait_exit(timeout_s=25)
        waited_s = time.monotonic() - started
    finally:
        server.stop()

    assert code == 0, server.log()[-2000:]
    assert waited_s < 20, "the second signal must not wait out the 30 s delay"
