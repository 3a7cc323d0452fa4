"""Dynamic batching: one queue and one device-owning worker thread per model.

Requests put one ``WorkItem`` per image into the queue from the event loop. The
worker takes up to ``max_batch_size`` items, waiting at most ``max_wait_ms`` after
the oldest one arrived. It runs one forward pass pruned to the union of the layers
the items request, and finishes each item's outputs on the device (pool, normalise,
cast). Then it copies them to the host and resolves each item's asyncio future on
the item's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import ClientDisconnectedError, DeadlineExceededError, FxServeError, NotReadyError, OutOfMemoryError, OverloadedError, PayloadTooLargeError
from .metrics import Metrics
from .pooling import OUTPUT_DTYPES, finish_features

__all__ = ["OutputSpec", "RequestTicket", "WorkItem", "ItemResult", "Batcher"]

logger = logging.getLogger(__name__)

# Runs the model on a device batch and returns the requested public layers.
BatchRunner = Callable[[torch.Tensor, Sequence[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class OutputSpec:
    """Outputs a request expects from each of its images."""

    layers: tuple[str, ...]
    pool: str = "none"
    normalize: bool = False
    dtype: str = "float32"


@dataclass(eq=False)
class RequestTicket:
    """State shared by all images of one request, read by the worker thread."""

    deadline: float
    # Seconds from the request's start to ``deadline``, for error messages.
    timeout_s: float
    # Set when the request no longer needs its images: it failed, timed out or its client left.
    cancelled: bool = False
    # Set only when the client left, so a deadline or an error is not counted as a disconnect.
    client_disconnected: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class ItemResult:
    outputs: dict[str, np.ndarray]
    queue_wait_s: float
    forward_s: float
    batch_size: int
    batch_id: int


@dataclass(eq=False)
class WorkItem:
    image: torch.Tensor
    spec: OutputSpec
    ticket: RequestTicket
    future: asyncio.Future[ItemResult]
    loop: asyncio.AbstractEventLoop

    def resolve(self, result: ItemResult) -> None:
        self.loop.call_soon_threadsafe(_set_result, self.future, result)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(_set_exception, self.future, error)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class Batcher:
    """Queue and worker of one model. ``submit`` runs on the event loop; the rest on the worker."""

    def __init__(
        self,
        model_name: str,
        runner: BatchRunner,
        *,
        device: torch.device,
        input_dtype: torch.dtype,
        memory_format: torch.memory_format = torch.contiguous_format,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: Metrics,
        stall_timeout_s: float,
    ) -> None:
        self.model_name = model_name
        self.runner = runner
        self.device = device
        self.input_dtype = input_dtype
        self.memory_format = memory_format
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self.stall_timeout_s = stall_timeout_s
        self._queue: deque[WorkItem] = deque()
        self._condition = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._busy_since: float | None = None
        self._recent_forward_s = 0.0
        self._batch_count = 0
        self._reserved = 0
        self._thread = threading.Thread(target=self._work, name=f"fxserve-worker-{model_name}", daemon=True)

    # --- event-loop side -------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def reserve(self, count: int) -> None:
        """Hold ``count`` queue places before decoding; raise OverloadedError when they do not fit.

        Reserving first means a full queue rejects a request before any image is
        decoded. Every reservation ends in ``submit`` or ``release``.
        """
        with self._condition:
            if not self._accepting:
                raise NotReadyError(f"model '{self.model_name}' is shutting down and takes no new requests; retry on another replica")
            if count > self.max_queue:
                raise PayloadTooLargeError(
                    f"the request has {count} images, more than model '{self.model_name}' can ever queue "
                    f"(max_queue={self.max_queue}); split it",
                    reason="too_many_images",
                )
            waiting = len(self._queue) + self._reserved
            if waiting + count > self.max_queue:
                retry_after = self.estimate_retry_after_s()
                raise OverloadedError(
                    f"model '{self.model_name}' has {waiting} images queued or decoding and takes at most {self.max_queue} "
                    f"(max_queue); {count} more do not fit. Retry after {retry_after} s",
                    headers={"Retry-After": str(retry_after)},
                    reason="queue_full",
                )
            self._reserved += count

    def release(self, count: int) -> None:
        """Give back places reserved for images that will not be submitted."""
        with self._condition:
            self._reserved -= count

    def submit(self, images: Sequence[torch.Tensor], spec: OutputSpec, ticket: RequestTicket) -> list[asyncio.Future[ItemResult]]:
        """Queue one request's images into places held by ``reserve``; return one future per image."""
        loop = asyncio.get_running_loop()
        items = [WorkItem(image, spec, ticket, loop.create_future(), loop) for image in images]
        with self._condition:
            self._reserved -= len(items)
            self._queue.extend(items)
            self.metrics.queue_depth.labels(model=self.model_name).set(len(self._queue))
            self._condition.notify()
        return [item.future for item in items]

    def estimate_retry_after_s(self) -> int:
        batches_ahead = len(self._queue) / self.max_batch_size + 1
        return max(1, round(batches_ahead * max(self._recent_forward_s, 0.01)))

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def waiting(self) -> int:
        """Images queued plus places reserved for images still decoding, the count that ``max_queue`` bounds."""
        return len(self._queue) + self._reserved

    @property
    def has_room(self) -> bool:
        return self.waiting < self.max_queue

    def is_healthy(self) -> bool:
        """True while the worker thread lives and no batch has run past the stall timeout."""
        if not self._thread.is_alive():
            return self._stopping
        busy_since = self._busy_since
        return busy_since is None or time.monotonic() - busy_since < self.stall_timeout_s

    def stop(self, timeout_s: float) -> bool:
        """Finish queued work, then end the worker; return False if it ran past ``timeout_s``."""
        with self._condition:
            self._accepting = False
            self._stopping = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # --- worker side -----------------------------------------------------

    def _work(self) -> None:
        while True:
            items = self._next_batch()
            if items is None:
                return
            try:
                self._busy_since = time.monotonic()
                self._run_batch(items)
            except BaseException as exc:  # noqa: BLE001 - no item may be left without an answer
                logger.exception("model %s: batch of %d images failed", self.model_name, len(items))
                for item in items:
                    item.fail(exc if isinstance(exc, FxServeError) else FxServeError("the forward pass failed; the server log has the traceback"))
            finally:
                self._busy_since = None

    def _next_batch(self) -> list[WorkItem] | None:
        with self._condition:
            while not self._queue:
                if self._stopping:
                    return None
                self._condition.wait(timeout=1.0)
            deadline = self._queue[0].ticket.enqueued_at + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(timeout=remaining)
            count = min(self.max_batch_size, len(self._queue))
            items = [self._queue.popleft() for _ in range(count)]
            self.metrics.queue_depth.labels(model=self.model_name).set(len(self._queue))
            return items

    def _run_batch(self, items: list[WorkItem]) -> None:
        live = self._drop_abandoned(items)
        if not live:
            return
        started = time.monotonic()
        for item in live:
            self.metrics.queue_wait.labels(model=self.model_name).observe(started - item.ticket.enqueued_at)
        self._forward_with_split(live)

    def _drop_abandoned(self, items: list[WorkItem]) -> list[WorkItem]:
        now = time.monotonic()
        live = []
        for item in items:
            if item.ticket.cancelled:
                # Either the client left, or the request already failed and its other images are not needed.
                item.fail(ClientDisconnectedError("the client closed the connection"))
            elif now > item.ticket.deadline:
                waited_s = now - item.ticket.enqueued_at
                item.fail(DeadlineExceededError(f"the request waited {waited_s:.2f} s in the queue, past its deadline; retry later or raise the deadline", reason="deadline"))
            else:
                live.append(item)
        return live

    def _forward_with_split(self, items: list[WorkItem]) -> None:
        """Run the batch; on out-of-memory, retry its halves until single images fail alone."""
        try:
            self._forward(items)
        except (RuntimeError, MemoryError) as exc:
            if not _is_out_of_memory(exc):
                raise
            _release_cached_memory(self.device)
            if len(items) == 1:
                logger.warning("model %s: out of memory on a single image: %s", self.model_name, exc)
                items[0].fail(OutOfMemoryError(f"model '{self.model_name}' ran out of device memory on this image even alone; send smaller images or fewer layers"))
                return
            middle = len(items) // 2
            logger.warning("model %s: out of memory on a batch of %d; retrying as %d + %d", self.model_name, len(items), middle, len(items) - middle)
            self._forward_with_split(items[:middle])
            self._forward_with_split(items[middle:])

    def _forward(self, items: list[WorkItem]) -> None:
        layers = sorted({layer for item in items for layer in item.spec.layers})
        forward_started = time.monotonic()
        with torch.inference_mode():
            batch = torch.stack([item.image for item in items]).to(self.device, self.input_dtype, non_blocking=True)
            batch = batch.contiguous(memory_format=self.memory_format)
            outputs = self.runner(batch, layers)
            per_item, non_finite = _finish_on_device(items, outputs)
        forward_s = time.monotonic() - forward_started
        self._recent_forward_s = forward_s
        self._batch_count += 1
        self._record_batch(items, forward_s)
        if non_finite:
            # JSON has no NaN or infinity, so these become null there; the binary encodings keep them.
            self.metrics.non_finite.labels(model=self.model_name).inc(non_finite)
            logger.warning("model %s: a batch of %d images produced %d NaN or infinite values (float16 overflow or broken weights)", self.model_name, len(items), non_finite)
        for item, item_outputs in zip(items, per_item):
            queue_wait_s = forward_started - item.ticket.enqueued_at
            item.resolve(ItemResult(item_outputs, queue_wait_s, forward_s, len(items), self._batch_count))

    def _record_batch(self, items: list[WorkItem], forward_s: float) -> None:
        self.metrics.forward_duration.labels(model=self.model_name).observe(forward_s)
        self.metrics.batch_images.labels(model=self.model_name).observe(len(items))
        self.metrics.batch_requests.labels(model=self.model_name).observe(len({id(item.ticket) for item in items}))
        self.metrics.images.labels(model=self.model_name).inc(len(items))
        logger.debug("model %s: ran a batch of %d images in %.1f ms", self.model_name, len(items), forward_s * 1000)


def _finish_on_device(items: list[WorkItem], outputs: dict[str, torch.Tensor]) -> tuple[list[dict[str, np.ndarray]], int]:
    """Pool, normalise and cast on the device per output spec, then copy each result once.

    Returns one ``{layer: array}`` per item, in item order, and the count of NaN
    and infinite values in them. The arrays are rows of the per-spec host copies,
    not copies of their own.
    """
    groups: dict[OutputSpec, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.spec, []).append(index)

    per_item: list[dict[str, np.ndarray]] = [{} for _ in items]
    non_finite = 0
    for spec, indices in groups.items():
        selector = None
        if len(indices) < len(items):
            selector = torch.tensor(indices, device=outputs[spec.layers[0]].device)
        for layer in spec.layers:
            features = outputs[layer] if selector is None else outputs[layer].index_select(0, selector)
            finished = finish_features(features, spec.pool, spec.normalize, OUTPUT_DTYPES[spec.dtype])
            non_finite += int((~torch.isfinite(finished)).sum())
            # Rows of a C-contiguous array are contiguous, so the encoders need no copy.
            host = finished.contiguous().cpu().numpy()
            for row, index in enumerate(indices):
                per_item[index][layer] = host[row]
    return per_item, non_finite


def _is_out_of_memory(exc: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator raises a plain RuntimeError.
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "out of memory" in text or "can't allocate memory" in text


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
