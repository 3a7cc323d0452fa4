"""Overload and request limits over real HTTP: the service rejects early and precisely, never with a 5xx.

Two servers start together for the module:

- ``limits``: a slow model (``BATCH_DELAY_S`` per batch, ``HANG_S`` on a plain
  black image) with ``max_queue: 4``, and small body, response and upload-time limits;
- ``concurrency``: a slower model with ``FXSERVE_MAX_CONCURRENT_REQUESTS=2``.
"""

from __future__ import annotations

import math
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .fault_models import faulty_config
from .imagefiles import noise_png, plain_png
from .serverproc import ServerProcess

MODEL = "slow"
MAX_QUEUE = 4
BATCH_DELAY_S = 0.3
HANG_S = 2.0
MAX_BODY_BYTES = 200_000
MAX_RESPONSE_BYTES = 100_000
BODY_READ_TIMEOUT_S = 1
FLOOD_REQUESTS = 24
CONCURRENCY_LIMIT = 2
CONCURRENCY_BATCH_DELAY_S = 1.5
POOLED_SHAPE = [512]

BASE_ENV = {"FXSERVE_TORCH_THREADS": "2", "FXSERVE_DECODE_WORKERS": "2", "FXSERVE_SHUTDOWN_DELAY_S": "0.1"}


@dataclass
class Servers:
    limits: ServerProcess
    concurrency: ServerProcess


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Servers:
    workdir = tmp_path_factory.mktemp("overload")

    slow = faulty_config(max_batch=64, delay_s=BATCH_DELAY_S, hang_s=HANG_S)
    slow.update(max_queue=MAX_QUEUE, max_batch_size=4, max_wait_ms=20)
    limits_env = {
        **BASE_ENV,
        "FXSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "FXSERVE_MAX_RESPONSE_BYTES": str(MAX_RESPONSE_BYTES),
        "FXSERVE_BODY_READ_TIMEOUT_S": str(BODY_READ_TIMEOUT_S),
    }
    limits = ServerProcess({"models": {MODEL: slow}}, workdir, env=limits_env, name="limits")

    slower = faulty_config(max_batch=64, delay_s=CONCURRENCY_BATCH_DELAY_S)
    concurrency_env = {**BASE_ENV, "FXSERVE_MAX_CONCURRENT_REQUESTS": str(CONCURRENCY_LIMIT)}
    concurrency = ServerProcess({"models": {MODEL: slower}}, workdir, env=concurrency_env, name="concurrency")

    # Both load at the same time to shorten the start-up wait.
    limits.start()
    concurrency.start()
    try:
        limits.wait_ready()
        concurrency.wait_ready()
        yield Servers(limits, concurrency)
    finally:
        limits.stop()
        concurrency.stop()


# --- helpers ---------------------------------------------------------------


def image_files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"image-{index}.png", data, "image/png")) for index, data in enumerate(images)]


def post_images(base_url: str, images: list[bytes], params: dict | None = None, headers: dict | None = None) -> httpx.Response:
    """POST on a connection of its own, so concurrent callers do not share one."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        return client.post("/extract", params={"model": MODEL, **(params or {})}, files=image_files(images), headers=headers)


def metric_value(metrics_text: str, sample_name: str, **labels: str) -> float:
    """Return the sum of the samples named ``sample_name`` whose labels include ``labels``, or 0 when none match."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(key) == value for key, value in labels.items()):
                total += sample.value
    return total


def read_metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.base_url}/metrics", timeout=10).text


def wait_until_in_flight(server: ServerProcess, started_before: float, image_count: int, timeout_s: float = 30.0) -> None:
    """Wait until ``image_count`` images sent after ``started_before`` are queued or in a forward pass.

    The worker observes an image's queue wait when its forward pass starts, and the queue depth counts the others.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = read_metrics(server)
        started = metric_value(text, "fxserve_queue_wait_seconds_count", model=MODEL) - started_before
        queued = metric_value(text, "fxserve_queue_depth", model=MODEL)
        if started + queued >= image_count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{image_count} images were not in flight after {timeout_s} s:\n{server.log()}")


@dataclass
class RawResponse:
    status: int
    head: bytes
    body: bytes


def raw_exchange(port: int, request: bytes, timeout_s: float = 15.0) -> RawResponse:
    """Send ``request`` as is on a new socket, never finish it, and read one HTTP response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"the server closed the connection after {received!r}")
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        while length and len(body) < int(length.group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    status = int(head.split(b" ", 2)[1])
    return RawResponse(status, head, body)


def error_message(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


# --- queue overload -----------------------------------------------------------


@dataclass
class FloodRun:
    responses: list[httpx.Response]
    sizes: list[int]
    after: httpx.Response
    metrics: str


@pytest.fixture(scope="module")
def flood(servers) -> FloodRun:
    """Send ``FLOOD_REQUESTS`` requests at once to a model that queues at most ``MAX_QUEUE`` images."""
    server = servers.limits
    sizes = [2 if number % 6 == 0 else 1 for number in range(FLOOD_REQUESTS)]
    start = threading.Barrier(FLOOD_REQUESTS)

    def send(number: int) -> httpx.Response:
        images = [noise_png(number * 10 + index) for index in range(sizes[number])]
        start.wait(timeout=30)
        return post_images(server.base_url, images)

    with ThreadPoolExecutor(FLOOD_REQUESTS) as pool:
        responses = list(pool.map(send, range(FLOOD_REQUESTS)))
    after = post_images(server.base_url, [noise_png(999)])
    return FloodRun(responses, sizes, after, read_metrics(server))


def test_flood_some_requests_get_429(flood):
    statuses = [response.status_code for response in flood.responses]
    assert 429 in statuses, statuses


def test_flood_no_server_errors(flood):
    statuses = [response.status_code for response in flood.responses]
    assert all(status < 500 for status in statuses), statuses


def test_flood_only_200_or_429(flood):
    statuses = [response.status_code for response in flood.responses]
    assert set(statuses) <= {200, 429}, statuses


def test_flood_429_has_integer_retry_after(flood):
    for response in flood.responses:
        if response.status_code == 429:
            assert re.fullmatch(r"[1-9][0-9]*", response.headers.get("retry-after", "")), response.headers


def test_flood_429_message_names_queue(flood):
    for response in flood.responses:
        if response.status_code == 429:
            message = error_message(response)
            assert f"max_queue={MAX_QUEUE}" in message or f"at most {MAX_QUEUE} (max_queue)" in message, message
            assert f"'{MODEL}'" in message, message


def test_flood_429_message_counts_full_queue(flood):
    # Every rejection in the flood comes from the full queue: the images waiting plus
    # the request's own (when the message gives them) must exceed it.
    for response in flood.responses:
        if response.status_code == 429:
            message = error_message(response)
            waiting = re.findall(r"has (\d+) images queued", message)
            assert waiting, message
            extra = re.findall(r"(\d+) more do not fit", message)
            requested = int(extra[0]) if extra else 1
            assert int(waiting[0]) + requested > MAX_QUEUE, message


def test_flood_accepted_requests_complete(flood):
    accepted = [(response, size) for response, size in zip(flood.responses, flood.sizes) if response.status_code == 200]
    assert accepted, "no request of the flood was accepted"
    for response, size in accepted:
        results = response.json()["results"]
        assert len(results) == size
        for result in results:
            assert result["pooled"]["shape"] == POOLED_SHAPE


def test_flood_request_after_succeeds(flood):
    assert flood.after.status_code == 200, flood.after.text


def test_flood_rejections_counted_by_reason(flood):
    reasons = {"overloaded", "queue_full"}
    counted = {reason: metric_value(flood.metrics, "fxserve_rejected_requests_total", model=MODEL, reason=reason) for reason in reasons}
    rejected = sum(response.status_code == 429 for response in flood.responses)
    assert sum(counted.values()) >= rejected, counted


# --- deadlines ------------------------------------------------------------------


@dataclass
class DeadlineRun:
    late: httpx.Response
    blocker: httpx.Response
    follow_up: httpx.Response
    images_run: float
    deadline_rejections: float
    disconnect_rejections: float


@pytest.fixture(scope="module")
def deadline_run(servers, flood) -> DeadlineRun:
    """Queue a request with a 0.3 s deadline behind a black image that keeps the worker busy for ``HANG_S``.

    Depends on ``flood`` only so the flood has finished before the counters are read.
    """
    server = servers.limits
    before = read_metrics(server)
    started_before = metric_value(before, "fxserve_queue_wait_seconds_count", model=MODEL)
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(post_images, server.base_url, [plain_png(0)])
        wait_until_in_flight(server, started_before, 1)
        late = post_images(server.base_url, [noise_png(1)], headers={"X-Request-Timeout": "0.3"})
        blocker_response = blocker.result()
    # The worker takes items in order, so once this response is back it has passed the late image.
    follow_up = post_images(server.base_url, [noise_png(2)])
    after = read_metrics(server)

    def increase(sample_name: str, **labels: str) -> float:
        return metric_value(after, sample_name, model=MODEL, **labels) - metric_value(before, sample_name, model=MODEL, **labels)

    return DeadlineRun(
        late=late,
        blocker=blocker_response,
        follow_up=follow_up,
        images_run=increase("fxserve_images_total"),
        deadline_rejections=increase("fxserve_rejected_requests_total", reason="deadline"),
        disconnect_rejections=increase("fxserve_rejected_requests_total", reason="client_disconnected"),
    )


def test_deadline_request_gets_504(deadline_run):
    assert deadline_run.late.status_code == 504, deadline_run.late.text


def test_deadline_error_code(deadline_run):
    assert deadline_run.late.json()["error"]["code"] == "deadline_exceeded"


def test_deadline_message_names_timeout(deadline_run):
    message = error_message(deadline_run.late)
    assert "0.3 s" in message, message


def test_deadline_blocking_request_still_succeeds(deadline_run):
    assert deadline_run.blocker.status_code == 200, deadline_run.blocker.text


def test_deadline_follow_up_succeeds(deadline_run):
    assert deadline_run.follow_up.status_code == 200, deadline_run.follow_up.text


def test_deadline_expired_image_never_runs(deadline_run):
    # The black image and the follow-up ran, but the expired image must not have run.
    assert deadline_run.images_run == 2


def test_deadline_counted_once(deadline_run):
    assert deadline_run.deadline_rejections == 1


def test_deadline_not_counted_as_disconnect(deadline_run):
    # The client waited for its 504; it never disconnected.
    assert deadline_run.disconnect_rejections == 0


# --- body size and upload time ----------------------------------------------------


def test_body_limit_chunked_upload_rejected(servers):
    chunk = b"\0" * 16384
    chunk_count = MAX_BODY_BYTES // len(chunk) + 2

    def body():
        for _ in range(chunk_count):
            yield chunk

    with httpx.Client(base_url=servers.limits.base_url, timeout=30) as client:
        # A generator body has no known length, so httpx sends it chunked, without Content-Length.
        response = client.post("/extract", params={"model": MODEL}, content=body(), headers={"Content-Type": "image/png"})
    assert response.status_code == 413, response.text
    assert "FXSERVE_MAX_BODY_BYTES" in error_message(response)


def test_body_limit_chunked_upload_under_limit_accepted(servers):
    image = noise_png(3)

    def body():
        yield image[: len(image) // 2]
        yield image[len(image) // 2 :]

    with httpx.Client(base_url=servers.limits.base_url, timeout=30) as client:
        response = client.post("/extract", params={"model": MODEL}, content=body(), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text


def test_body_limit_declared_length_rejected_before_body(servers):
    declared = MAX_BODY_BYTES * 50
    head = (
        f"POST /extract?model={MODEL} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: image/png\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    # No body byte is sent: a server that waited for the body would respond with 408 after
    # BODY_READ_TIMEOUT_S instead of 413.
    response = raw_exchange(servers.limits.port, head)
    assert response.status == 413, response.head + response.body
    assert str(declared).encode() in response.body


def test_slow_upload_gets_408(servers):
    head = (
        f"POST /extract?model={MODEL} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    response = raw_exchange(servers.limits.port, head + b"\x89PNG" + b"\0" * 96)
    assert response.status == 408, response.head + response.body
    assert b"FXSERVE_BODY_READ_TIMEOUT_S" in response.body


# --- response cost admission ---------------------------------------------------------


def layer1_estimate(server: ServerProcess, image_count: int) -> int:
    """Float32 bytes of ``image_count`` unpooled layer1 outputs, from the shape /models reports."""
    description = httpx.get(f"{server.base_url}/models/{MODEL}", timeout=10).json()
    return math.prod(description["layers"]["layer1"]["shape"]) * 4 * image_count


def test_cost_large_layer_rejected(servers):
    images = [noise_png(seed) for seed in range(4)]
    estimate = layer1_estimate(servers.limits, len(images))
    assert estimate > MAX_RESPONSE_BYTES, "the request must be over the limit for this test"
    response = post_images(servers.limits.base_url, images, params={"layers": "layer1"})
    assert response.status_code == 413, response.text


def test_cost_message_names_estimate_and_limit(servers):
    images = [noise_png(seed) for seed in range(4)]
    estimate = layer1_estimate(servers.limits, len(images))
    response = post_images(servers.limits.base_url, images, params={"layers": "layer1"})
    message = error_message(response)
    assert str(estimate) in message, message
    assert str(MAX_RESPONSE_BYTES) in message, message


def test_cost_pooled_layer_accepted(servers):
    images = [noise_png(seed) for seed in range(4)]
    response = post_images(servers.limits.base_url, images, params={"layers": "layer1", "pool": "avg"})
    assert response.status_code == 200, response.text
    shapes = [result["layer1"]["shape"] for result in response.json()["results"]]
    assert shapes == [[64]] * len(images)


def test_cost_rejection_counted(servers):
    before = metric_value(read_metrics(servers.limits), "fxserve_rejected_requests_total", model=MODEL, reason="too_costly")
    post_images(servers.limits.base_url, [noise_png(seed) for seed in range(4)], params={"layers": "layer1"})
    after = metric_value(read_metrics(servers.limits), "fxserve_rejected_requests_total", model=MODEL, reason="too_costly")
    assert after - before == 1


# --- requests in flight -------------------------------------------------------------


@dataclass
class ConcurrencyRun:
    first: list[httpx.Response]
    third: httpx.Response
    after: httpx.Response


@pytest.fixture(scope="module")
def concurrency_run(servers) -> ConcurrencyRun:
    server = servers.concurrency
    started_before = metric_value(read_metrics(server), "fxserve_queue_wait_seconds_count", model=MODEL)
    with ThreadPoolExecutor(CONCURRENCY_LIMIT) as pool:
        first = [pool.submit(post_images, server.base_url, [noise_png(seed)]) for seed in range(CONCURRENCY_LIMIT)]
        wait_until_in_flight(server, started_before, CONCURRENCY_LIMIT)
        third = post_images(server.base_url, [noise_png(10)])
        first_responses = [future.result() for future in first]
    after = post_images(server.base_url, [noise_png(11)])
    return ConcurrencyRun(first_responses, third, after)


def test_concurrency_limit_rejects_extra_request(concurrency_run):
    assert concurrency_run.third.status_code == 429, concurrency_run.third.text


def test_concurrency_limit_message_names_setting(concurrency_run):
    message = error_message(concurrency_run.third)
    assert f"FXSERVE_MAX_CONCURRENT_REQUESTS={CONCURRENCY_LIMIT}" in message, message


def test_concurrency_limit_sets_retry_after(concurrency_run):
    assert re.fullmatch(r"[1-9][0-9]*", concurrency_run.third.headers.get("retry-after", "")), concurrency_run.third.headers


def test_concurrency_limit_admitted_requests_succeed(concurrency_run):
    statuses = [response.status_code for response in concurrency_run.first]
    assert statuses == [200] * CONCURRENCY_LIMIT


def test_concurrency_limit_frees_slot_after_completion(concurrency_run):
    assert concurrency_run.after.status_code == 200, concurrency_run.after.text


def test_request_larger_than_queue_gets_413(servers):
    # More images than max_queue could never be queued, so retrying (429) would not help.
    images = [noise_png(700 + index) for index in range(MAX_QUEUE + 1)]

    response = post_images(servers.limits.base_url, images)

    assert response.status_code == 413, response.text
    assert f"max_queue={MAX_QUEUE}" in error_message(response)
