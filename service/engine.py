"""The engine: loads every configured model, owns the lifecycle, runs requests.

Thread model: the event loop parses requests and awaits futures. The decode pool
decodes and preprocesses images. One worker thread per model owns its device and
runs the forward passes (``batching.Batcher``). Start-up (``load_all``) runs in a
thread of its own so ``/healthz`` responds while models load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Iterator
from enum import Enum
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .batching import Batcher, ItemResult, OutputSpec, RequestTicket
from .config import ModelConfig, ServiceConfig
from .errors import ConfigError, WeightsUnavailableError, DeadlineExceededError, FxServeError, InvalidParameterError, ModelNotFoundError, NotReadyError, OverloadedError, PayloadTooLargeError, show
from .extractors import ExtractorSet, LayerInfo
from .loading import LoadedModel, checkpoint_path_for, load_model, resolve_weights
from .metrics import Metrics
from .pooling import OUTPUT_DTYPES, POOL_CHOICES, pooled_shape
from .preprocess import ImageLimits, check_resized_size, decode_image
from .settings import Settings

__all__ = ["ImageInput", "ExtractOutcome", "ModelRuntime", "Engine", "configure_torch", "resolve_device"]

logger = logging.getLogger(__name__)

_MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
_WARM_UP_IMAGES = 2


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    filename: str | None = None


@dataclass
class ExtractOutcome:
    model: str
    spec: OutputSpec
    results: list[dict[str, Any]]
    decode_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


def configure_torch(settings: Settings) -> None:
    """Set intra-op threads and flush denormals; call once per process before loading."""
    torch.set_num_threads(settings.resolved_torch_threads)
    # Random or badly trained weights produce subnormal floats that make CPU kernels
    # several times slower; flushing them to zero changes results by less than 1e-38.
    torch.set_flush_denormal(True)


def resolve_device(name: str, value: str) -> torch.device:
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(name, "device", f"{value} was requested but CUDA is not available", "Use device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(name, "device", f"{value} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class ModelRuntime:
    """One loaded model: its extractors on the device, its batcher, its metadata."""

    def __init__(self, name: str, config: ModelConfig, loaded: LoadedModel, device: torch.device, extractors: ExtractorSet, load_s: float) -> None:
        self.name = name
        self.config = config
        self.loaded = loaded
        self.device = device
        self.dtype = _MODEL_DTYPES[config.dtype]
        self.extractors = extractors
        self.load_s = load_s
        self.layers: dict[str, LayerInfo] = extractors.layers
        self.default_layers = extractors.expand(config.resolved_default_layers)
        self.embed_layer = self._pick_embed_layer()
        self.batcher: Batcher | None = None

    @classmethod
    def load(cls, name: str, config: ModelConfig, settings: Settings, metrics: Metrics) -> "ModelRuntime":
        """Build, trace, move, warm up and start the worker; raise ConfigError."""
        started = time.monotonic()
        device = resolve_device(name, config.device)
        loaded = load_model(name, config)
        module = loaded.module.to(device=device, dtype=_MODEL_DTYPES[config.dtype], memory_format=_MEMORY_FORMATS[config.memory_format])
        extractors = ExtractorSet(name, module, config.layers, config.tracer, config.extractor_cache_size)
        extractors.validate_nodes()
        height, width = loaded.preprocessor.output_size
        warm_up = torch.zeros(_WARM_UP_IMAGES, 3, height, width, device=device, dtype=_MODEL_DTYPES[config.dtype])
        warm_up = warm_up.contiguous(memory_format=_MEMORY_FORMATS[config.memory_format])
        try:
            with torch.inference_mode():
                extractors.warm_up(warm_up)
        except ConfigError:
            raise
        except Exception as exc:  # any kernel or shape error surfaces here first
            raise ConfigError(name, "layers", f"the warm-up forward pass failed: {type(exc).__name__}: {exc}") from exc

        runtime = cls(name, config, loaded, device, extractors, time.monotonic() - started)
        # Tracing pauses every model's forward passes (see extractors.TRACE_LOCK), so
        # build the extractors most requests use now rather than on their first request.
        for layers in (runtime.default_layers, [runtime.embed_layer]):
            extractors.extractor_for(extractors.layers[layer].node for layer in layers)
        runtime.batcher = Batcher(
            name,
            extractors.run,
            device=device,
            input_dtype=runtime.dtype,
            memory_format=_MEMORY_FORMATS[config.memory_format],
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue,
            metrics=metrics,
            stall_timeout_s=settings.worker_stall_timeout_s,
        )
        runtime.batcher.start()
        return runtime

    def _pick_embed_layer(self) -> str:
        if self.config.embed_layer:
            return self.extractors.expand([self.config.embed_layer])[0]
        return self.default_layers[-1]

    def resolve_layers(self, requested: list[str] | None) -> tuple[str, ...]:
        if not requested:
            return tuple(self.default_layers)
        unknown = [name for name in requested if name not in self.layers]
        if unknown:
            raise InvalidParameterError(f"model '{self.name}' has no layer {', '.join(map(show, unknown[:5]))}; valid layers: {', '.join(self.layers)}")
        return tuple(dict.fromkeys(requested))

    def estimate_response_bytes(self, spec: OutputSpec, image_count: int) -> int:
        itemsize = torch.empty((), dtype=OUTPUT_DTYPES[spec.dtype]).element_size()
        per_image = sum(math.prod(pooled_shape(self.layers[layer].shape, spec.pool)) for layer in spec.layers)
        return per_image * itemsize * image_count

    def describe(self) -> dict[str, Any]:
        layers = {}
        for name, info in self.layers.items():
            layers[name] = {
                "node": info.node,
                "entry": info.key,
                "shape": list(info.shape),
                "dtype": info.dtype,
                "embedding_dim": math.prod(pooled_shape(info.shape, "avg")),
            }
        return {
            "name": self.name,
            "status": "ready",
            "architecture": self.config.architecture,
            "submodule": self.config.submodule,
            "weights": self.loaded.weights_description,
            "random_weights": self.loaded.random_weights,
            "device": str(self.device),
            "dtype": self.config.dtype,
            "memory_format": self.config.memory_format,
            "layers": layers,
            "default_layers": self.default_layers,
            "embed_layer": self.embed_layer,
            "preprocess": self.loaded.preprocessor.describe(),
            "max_batch_size": self.config.max_batch_size,
            "max_wait_ms": self.config.max_wait_ms,
            "max_queue": self.config.max_queue,
            "load_seconds": round(self.load_s, 3),
        }

    def provenance(self, layer: str, spec: OutputSpec) -> dict[str, Any]:
        """Facts a vector database must store with the vectors to keep them comparable."""
        info = self.layers[layer]
        return {
            "architecture": self.config.architecture,
            "submodule": self.config.submodule,
            "weights": self.loaded.weights_description,
            "node": info.node,
            "entry": info.key,
            "pooling": spec.pool,
            "normalization": "l2" if spec.normalize else "none",
            "preprocessing": self.loaded.preprocessor.describe(),
            "model_dtype": self.config.dtype,
            "memory_format": self.config.memory_format,
            "output_dtype": spec.dtype,
        }


class Engine:
    """All models and the lifecycle: loading -> ready -> draining -> stopped."""

    def __init__(self, config: ServiceConfig, settings: Settings, metrics: Metrics) -> None:
        self.config = config
        self.settings = settings
        self.metrics = metrics
        self.runtimes: dict[str, ModelRuntime] = {}
        self.failed: dict[str, str] = {}
        self.state = "loading"
        self.fatal_error: BaseException | None = None
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_resized_pixels)
        self.decode_pool = ThreadPoolExecutor(settings.resolved_decode_workers, thread_name_prefix="fxserve-decode")
        self._state_lock = threading.Lock()
        self._in_flight = 0  # changed on the event loop only
        for name in config.models:
            # Export every per-model series from the start: an autoscaler reads a
            # missing queue depth as "unknown" and does not scale.
            metrics.model_ready.labels(model=name).set(0)
            metrics.queue_depth.labels(model=name).set(0)
            metrics.images.labels(model=name)

    # --- lifecycle -------------------------------------------------------

    def load_all(self) -> None:
        """Load every model in order; on failure either record it or stop (fatal_error)."""
        for name, model_config in self.config.models.items():
            if self.state != "loading":
                return
            try:
                runtime = ModelRuntime.load(name, model_config, self.settings, self.metrics)
            except Exception as exc:  # noqa: BLE001 - reported below, with the traceback for unexpected types
                self._record_failure(name, exc)
                if not self.settings.allow_failed_models:
                    self.fatal_error = exc
                    return
                continue
            self.runtimes[name] = runtime
            self.metrics.model_load.labels(model=name).set(runtime.load_s)
            self.metrics.model_ready.labels(model=name).set(1)
            self.metrics.worker_healthy.labels(model=name).set(1)
            logger.info(
                "model %s loaded in %.2f s on %s (%s, weights %s); layers: %s",
                name, runtime.load_s, runtime.device, model_config.dtype, runtime.loaded.weights_description,
                ", ".join(f"{layer}={list(info.shape)}" for layer, info in runtime.layers.items()),
            )
        if not self.runtimes:
            self.fatal_error = self.fatal_error or RuntimeError("no model could be loaded")
            return
        self._set_state("ready", expected="loading")
        logger.info("ready: serving %s", ", ".join(self.runtimes))

    def _record_failure(self, name: str, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, FxServeError) else f"{type(exc).__name__}: {exc}"
        self.failed[name] = message
        if isinstance(exc, WeightsUnavailableError):
            logger.error("model %s failed to load: %s", name, message)
            missing = self._uncached_weights(exclude=name)
            if missing:
                logger.error("these configured weights are not cached either: %s", ", ".join(missing))
        elif isinstance(exc, ConfigError):
            logger.error("model %s failed to load: %s", name, message)
        else:
            logger.error("model %s failed to load", name, exc_info=exc)

    def _uncached_weights(self, exclude: str) -> list[str]:
        """List the weight files of other models that are missing from the torch hub cache."""
        missing = []
        for name, model_config in self.config.models.items():
            if name == exclude or name in self.runtimes:
                continue
            try:
                weights = resolve_weights(name, model_config)
            except ConfigError:
                continue
            if isinstance(weights, Enum) and not checkpoint_path_for(weights).is_file():
                missing.append(f"{checkpoint_path_for(weights)} (model {name})")
        return missing

    def _set_state(self, state: str, expected: str | None = None) -> bool:
        with self._state_lock:
            if expected is not None and self.state != expected:
                return False
            self.state = state
        self.metrics.set_state(state)
        return True

    def begin_drain(self) -> None:
        """Turn readiness off; requests are still accepted until ``shutdown`` stops the batchers."""
        if self.state in ("draining", "stopped"):
            return
        self._set_state("draining")
        logger.info("draining: readiness is off")

    def shutdown(self, timeout_s: float) -> None:
        """Finish all queued work within ``timeout_s``, then stop the workers and the pool."""
        self.begin_drain()
        deadline = time.monotonic() + timeout_s
        for name, runtime in self.runtimes.items():
            if not runtime.batcher.stop(max(0.0, deadline - time.monotonic())):
                logger.error("model %s: the worker did not finish its queue within %.0f s", name, timeout_s)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self._set_state("stopped")
        logger.info("stopped")

    def is_ready(self) -> bool:
        """True in state ready; failed models (only possible with allow_failed_models) are listed, not blocking."""
        return self.state == "ready"

    @contextmanager
    def admit(self, runtime: ModelRuntime) -> Iterator[None]:
        """Count a request in flight; raise OverloadedError at once past the limit or with a full queue.

        Called before the body is read, so rejected requests cost no upload or decode.
        """
        problem = None
        if self._in_flight >= self.settings.max_concurrent_requests:
            problem = f"the service has {self._in_flight} requests in flight, the limit (FXSERVE_MAX_CONCURRENT_REQUESTS={self.settings.max_concurrent_requests})"
        elif not runtime.batcher.has_room:
            problem = f"model '{runtime.name}' has {runtime.batcher.waiting} images queued or decoding, its limit (max_queue={runtime.config.max_queue})"
        if problem is not None:
            retry_after = runtime.batcher.estimate_retry_after_s()
            raise OverloadedError(f"{problem}; retry after {retry_after} s", headers={"Retry-After": str(retry_after)}, reason="overloaded")
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    def unhealthy_workers(self) -> list[str]:
        unhealthy = [name for name, runtime in self.runtimes.items() if not runtime.batcher.is_healthy()]
        for name in self.runtimes:
            self.metrics.worker_healthy.labels(model=name).set(0 if name in unhealthy else 1)
        return unhealthy

    # --- requests --------------------------------------------------------

    def get(self, name: str | None) -> ModelRuntime:
        """Return the runtime for ``name``; None works when exactly one model is configured."""
        if name is None or name == "":
            if len(self.config.models) != 1:
                raise InvalidParameterError(f"several models are configured, so the query parameter 'model' is required; valid models: {', '.join(self.config.models)}")
            name = next(iter(self.config.models))
        if name not in self.config.models:
            raise ModelNotFoundError(f"model {show(name)} is not configured; valid models: {', '.join(self.config.models)}")
        if name in self.failed:
            raise NotReadyError(f"model '{name}' failed to load: {self.failed[name]}")
        runtime = self.runtimes.get(name)
        if runtime is None or self.state == "loading":
            raise NotReadyError(f"model '{name}' is still loading; retry when /readyz returns 200", headers={"Retry-After": "5"})
        if self.state == "stopped":
            raise NotReadyError("the service is stopped")
        return runtime

    def make_spec(self, runtime: ModelRuntime, layers: list[str] | None, pool: str, normalize: bool, dtype: str) -> OutputSpec:
        if pool not in POOL_CHOICES:
            raise InvalidParameterError(f"pool {show(pool)} is not valid; valid: {', '.join(POOL_CHOICES)}")
        if dtype not in OUTPUT_DTYPES:
            raise InvalidParameterError(f"dtype {show(dtype)} is not valid; valid: {', '.join(OUTPUT_DTYPES)}")
        return OutputSpec(runtime.resolve_layers(layers), pool, normalize, dtype)

    async def run(self, runtime: ModelRuntime, images: list[ImageInput], spec: OutputSpec, ticket: RequestTicket) -> ExtractOutcome:
        """Decode, queue and await one request's images; results keep the input order."""
        self._check_admission(runtime, images, spec)
        runtime.batcher.reserve(len(images))
        try:
            decode_started = time.monotonic()
            tensors = await self._decode_all(runtime, images)
            decode_s = time.monotonic() - decode_started
        except BaseException:
            runtime.batcher.release(len(images))
            raise

        ticket.enqueued_at = time.monotonic()
        futures = runtime.batcher.submit(tensors, spec, ticket)
        remaining = ticket.deadline - time.monotonic()
        try:
            results: list[ItemResult] = await asyncio.wait_for(asyncio.gather(*futures), timeout=max(remaining, 0.001))
        except TimeoutError:
            ticket.cancelled = True
            raise DeadlineExceededError(
                f"the request did not finish within its deadline of {ticket.timeout_s:g} s; retry later, or send a larger "
                f"X-Request-Timeout header (at most FXSERVE_REQUEST_TIMEOUT_S={self.settings.request_timeout_s:g} s)",
                reason="deadline",
            ) from None
        except BaseException:
            ticket.cancelled = True
            raise
        return ExtractOutcome(
            model=runtime.name,
            spec=spec,
            results=[result.outputs for result in results],
            decode_s=decode_s,
            queue_s=max(result.queue_wait_s for result in results),
            inference_s=sum({result.batch_id: result.forward_s for result in results}.values()),
            batch_sizes=[result.batch_size for result in results],
        )

    def _check_admission(self, runtime: ModelRuntime, images: list[ImageInput], spec: OutputSpec) -> None:
        if not images:
            raise InvalidParameterError("the request has no images; send them as multipart field 'images', as JSON {\"images\": [base64, ...]}, or as a raw image/* body")
        if len(images) > self.settings.max_images_per_request:
            raise PayloadTooLargeError(
                f"the request has {len(images)} images, more than the limit of {self.settings.max_images_per_request} (FXSERVE_MAX_IMAGES_PER_REQUEST); split it",
                reason="too_many_images",
            )
        estimate = runtime.estimate_response_bytes(spec, len(images))
        if estimate > self.settings.max_response_bytes:
            raise PayloadTooLargeError(
                f"the outputs would take about {estimate} bytes as raw {spec.dtype} ({len(images)} images x layers "
                f"{', '.join(spec.layers)}, pool={spec.pool}), more than the limit of {self.settings.max_response_bytes} bytes "
                "(FXSERVE_MAX_RESPONSE_BYTES); ask for fewer images or layers, pool the outputs, or use dtype=float16",
                reason="too_costly",
            )

    async def _decode_all(self, runtime: ModelRuntime, images: list[ImageInput]) -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        tasks = [loop.run_in_executor(self.decode_pool, self._decode_one, runtime, image, index) for index, image in enumerate(images)]
        try:
            return await asyncio.gather(*tasks)
        except FxServeError:
            for task in tasks:
                task.cancel()
            raise

    def _decode_one(self, runtime: ModelRuntime, image: ImageInput, index: int) -> torch.Tensor:
        started = time.monotonic()
        decoded = decode_image(image.data, index, image.filename, self.limits)
        check_resized_size(decoded, runtime.loaded.preprocessor, index, image.filename, self.limits)
        tensor = runtime.loaded.preprocessor(decoded)
        self.metrics.decode_duration.labels(model=runtime.name).observe(time.monotonic() - started)
        return tensor
