"""HTTP layer: parse the request, call the engine, shape the response.

``create_app`` wires an ``Engine`` into a FastAPI app. Model loading starts in the
lifespan, in a thread, so the liveness probe responds while models load.
"""

from __future__ import annotations

import asyncio
import binascii
import base64
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import PlainTextResponse, Response

from . import __version__
from .batching import RequestTicket
from .encoding import ENCODINGS, SAFETENSORS_MEDIA_TYPE, dumps, embed_safetensors, encode_array, extract_safetensors, wants_safetensors
from .engine import Engine, ExtractOutcome, ImageInput
from .errors import BadRequestError, FxServeError, InvalidImageError, InvalidParameterError, ModelNotFoundError, PayloadTooLargeError, UnsupportedMediaTypeError, closest, show
from .http_errors import install_error_handlers
from .metrics import CONTENT_TYPE_LATEST
from .middleware import AuthMiddleware, BodyLimitMiddleware, ObservabilityMiddleware

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

# Responses with more numbers than this are encoded in a worker thread, off the event loop.
_INLINE_ENCODE_MAX_ELEMENTS = 200_000

_IMAGES_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "required": ["images"],
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}},
                "required": ["images"],
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "request_id": {"type": "string"}},
        }
    },
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for status, description in {
        400: "An image cannot be decoded or the body is malformed.",
        401: "API keys are configured and the bearer token is missing or invalid.",
        404: "The model is not configured.",
        408: "The request body did not arrive in time.",
        413: "Too many images, an image over a size limit, or outputs over the response limit.",
        415: "The content type is not multipart/form-data, application/json or image/*.",
        422: "An invalid query parameter or header.",
        429: "The queue is full or too many requests are in flight; see Retry-After.",
        503: "The model is loading, failed to load, or the service is draining.",
        504: "The request passed its deadline.",
        507: "An image ran out of device memory even alone.",
    }.items()
}


def create_app(engine: Engine, *, on_fatal: Callable[[], None] | None = None, api_keys: list[str] | None = None) -> FastAPI:
    """Build the app. ``on_fatal`` is called when start-up fails, to stop the server."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=engine.load_all, name="fxserve-loader", daemon=True)
        loader.start()
        watcher = asyncio.create_task(_watch_loading(engine, loader, on_fatal))
        try:
            yield
        finally:
            watcher.cancel()
            await run_in_threadpool(engine.shutdown, engine.settings.drain_timeout_s)

    app = FastAPI(
        title="fxserve",
        version=__version__,
        description="Intermediate features and embeddings of torchvision models, from pruned torch.fx extractors.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=engine.settings.max_body_bytes,
        read_timeout_s=engine.settings.body_read_timeout_s,
        total_timeout_s=engine.settings.request_timeout_s,
    )
    app.add_middleware(AuthMiddleware, api_keys=api_keys or [])
    app.add_middleware(ObservabilityMiddleware, metrics=engine.metrics, model_names=list(engine.config.models))
    _add_routes(app, engine)
    return app


async def _watch_loading(engine: Engine, loader: threading.Thread, on_fatal: Callable[[], None] | None) -> None:
    while loader.is_alive():
        await asyncio.sleep(0.1)
    if engine.fatal_error is not None:
        logger.critical("start-up failed, stopping: %s", getattr(engine.fatal_error, "message", engine.fatal_error))
        if on_fatal is not None:
            on_fatal()


def _add_routes(app: FastAPI, engine: Engine) -> None:
    @app.post("/extract", openapi_extra={"requestBody": _IMAGES_REQUEST_BODY}, responses=_ERROR_RESPONSES, summary="Return intermediate feature maps for each image.")
    async def extract(
        request: Request,
        model: str | None = Query(None, description="Configured model name; optional when one model is configured."),
        layers: str | None = Query(None, description="Comma-separated layer names; default: the model's default_layers."),
        pool: str = Query("none", description="none, avg, max or gem (p=3)."),
        normalize: bool = Query(False, description="L2-normalise each image's (pooled) output."),
        encoding: str = Query("json", description="json (nested lists) or base64 (raw little-endian bytes)."),
        dtype: str = Query("float32", description="float32 or float16."),
    ) -> Response:
        _reject_unknown_query(request, _EXTRACT_PARAMETERS)
        if encoding not in ENCODINGS:
            raise InvalidParameterError(f"encoding {show(encoding)} is not valid; valid: {', '.join(ENCODINGS)}")
        runtime = engine.get(model)
        spec = engine.make_spec(runtime, _split_layers(layers), pool, normalize, dtype)
        outcome = await _run(request, engine, runtime, spec)
        if wants_safetensors(request.headers.get("accept")):
            metadata = {"model": outcome.model, "layers": ",".join(spec.layers), "pool": spec.pool, "normalize": str(spec.normalize).lower()}
            body = await _encode(extract_safetensors, outcome.results, metadata, size=_element_count(outcome))
            return _timed(Response(body, media_type=SAFETENSORS_MEDIA_TYPE), outcome, request)
        payload = {
            "model": outcome.model,
            "layers": list(spec.layers),
            "pool": spec.pool,
            "normalize": spec.normalize,
            "results": [{layer: encode_array(array, encoding) for layer, array in result.items()} for result in outcome.results],
        }
        body = await _encode(dumps, payload, size=_element_count(outcome))
        return _timed(Response(body, media_type="application/json"), outcome, request)

    @app.post("/embed", openapi_extra={"requestBody": _IMAGES_REQUEST_BODY}, responses=_ERROR_RESPONSES, summary="Return one average-pooled, L2-normalised vector per image.")
    async def embed(
        request: Request,
        model: str | None = Query(None, description="Configured model name; optional when one model is configured."),
        layer: str | None = Query(None, description="Layer to pool; default: the model's embed_layer."),
        dtype: str = Query("float32", description="float32 or float16."),
    ) -> Response:
        _reject_unknown_query(request, _EMBED_PARAMETERS)
        runtime = engine.get(model)
        spec = engine.make_spec(runtime, [layer or runtime.embed_layer], "avg", True, dtype)
        outcome = await _run(request, engine, runtime, spec)
        chosen = spec.layers[0]
        embeddings = np.stack([result[chosen].reshape(-1) for result in outcome.results])
        provenance = runtime.provenance(chosen, spec)
        if wants_safetensors(request.headers.get("accept")):
            metadata = {"model": outcome.model, "layer": chosen, "provenance": orjson.dumps(provenance).decode()}
            return _timed(Response(embed_safetensors(embeddings, metadata), media_type=SAFETENSORS_MEDIA_TYPE), outcome, request)
        payload = {"model": outcome.model, "layer": chosen, "dim": int(embeddings.shape[1]), "embeddings": embeddings, "provenance": provenance}
        body = await _encode(dumps, payload, size=embeddings.size)
        return _timed(Response(body, media_type="application/json"), outcome, request)

    @app.get("/models", summary="Describe every configured model: layers, shapes, preprocessing, device.")
    async def list_models() -> Response:
        return Response(dumps({"models": [_describe(engine, name) for name in engine.config.models]}), media_type="application/json")

    @app.get("/models/{name}", responses={404: _ERROR_RESPONSES[404]}, summary="Describe one model.")
    async def get_model(name: str) -> Response:
        if name not in engine.config.models:
            raise ModelNotFoundError(f"model {show(name)} is not configured; valid models: {', '.join(engine.config.models)}")
        return Response(dumps(_describe(engine, name)), media_type="application/json")

    @app.get("/models/{name}/nodes", responses={404: _ERROR_RESPONSES[404], 503: _ERROR_RESPONSES[503]}, summary="List the model's graph node names in train and eval mode.")
    async def get_nodes(name: str) -> Response:
        runtime = engine.get(name)
        train, eval_ = await run_in_threadpool(runtime.extractors.node_names)
        return Response(dumps({"model": name, "train": train, "eval": eval_}), media_type="application/json")

    @app.api_route("/healthz", methods=["GET", "HEAD"], responses={503: {"description": "A device worker is dead or stalled, or start-up failed."}}, summary="Liveness: the process and every device worker are alive.")
    async def healthz() -> Response:
        unhealthy = engine.unhealthy_workers()
        if unhealthy or engine.fatal_error is not None:
            reason = f"worker of {', '.join(unhealthy)} is dead or stalled" if unhealthy else "start-up failed"
            return Response(dumps({"status": "unhealthy", "reason": reason}), status_code=503, media_type="application/json")
        return Response(dumps({"status": "alive", "state": engine.state}), media_type="application/json")

    @app.api_route("/readyz", methods=["GET", "HEAD"], responses={503: {"description": "Loading, draining, stopped, or start-up failed."}}, summary="Readiness: 200 only when every model is loaded and the service is not draining.")
    async def readyz() -> Response:
        status = "ready" if engine.is_ready() else "not_ready"
        if engine.is_ready() and engine.failed:
            status = "degraded"
        body = {
            "status": status,
            "state": engine.state,
            "models": {name: _model_status(engine, name) for name in engine.config.models},
        }
        if engine.failed:
            body["failed"] = engine.failed
        return Response(dumps(body), status_code=200 if engine.is_ready() else 503, media_type="application/json")

    @app.api_route("/metrics", methods=["GET", "HEAD"], response_class=PlainTextResponse, summary="Prometheus metrics in the text exposition format.")
    async def metrics() -> Response:
        engine.unhealthy_workers()
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)


_EXTRACT_PARAMETERS = frozenset({"model", "layers", "pool", "normalize", "encoding", "dtype"})
_EMBED_PARAMETERS = frozenset({"model", "layer", "dtype"})


def _reject_unknown_query(request: Request, allowed: frozenset[str]) -> None:
    """Raise 422 for a misspelled or repeated query parameter instead of ignoring it."""
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = sorted(set(names) - allowed)
    if unknown:
        hints = [f"{show(name)} (did you mean {closest(name, allowed)[0]!r}?)" if closest(name, allowed) else show(name) for name in unknown[:5]]
        raise InvalidParameterError(f"unknown query parameter {', '.join(hints)}; valid: {', '.join(sorted(allowed))}")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise InvalidParameterError(f"query parameter {', '.join(map(show, repeated))} is given more than once; give it once (layers takes a comma-separated list)")


def _model_status(engine: Engine, name: str) -> str:
    if name in engine.failed:
        return "failed"
    if name in engine.runtimes:
        return "ready"
    return "loading"


def _describe(engine: Engine, name: str) -> dict[str, Any]:
    runtime = engine.runtimes.get(name)
    if runtime is not None:
        return runtime.describe()
    config = engine.config.models[name]
    described: dict[str, Any] = {"name": name, "status": _model_status(engine, name), "architecture": config.architecture, "weights": config.weights}
    if name in engine.failed:
        described["error"] = engine.failed[name]
    return described


def _split_layers(layers: str | None) -> list[str] | None:
    if layers is None:
        return None
    names = [name.strip() for name in layers.split(",") if name.strip()]
    return names or None


async def _run(request: Request, engine: Engine, runtime, spec) -> ExtractOutcome:
    timeout_s = _timeout_s(request, engine.settings.request_timeout_s)
    deadline = time.monotonic() + timeout_s
    with engine.admit(runtime):
        images = await read_images(request)
        ticket = RequestTicket(deadline=deadline, timeout_s=timeout_s)
        watcher = asyncio.create_task(_watch_disconnect(request, ticket))
        try:
            return await engine.run(runtime, images, spec, ticket)
        finally:
            watcher.cancel()


def _timeout_s(request: Request, default_s: float) -> float:
    """Return the request's deadline in seconds; the X-Request-Timeout header may only lower it."""
    header = request.headers.get("x-request-timeout")
    if header is None:
        return default_s
    try:
        requested = float(header)
    except ValueError:
        raise InvalidParameterError(f"header X-Request-Timeout={header!r} is not a number of seconds") from None
    if not requested > 0:
        raise InvalidParameterError(f"header X-Request-Timeout={header!r} must be a positive number of seconds")
    return min(requested, default_s)


async def _watch_disconnect(request: Request, ticket: RequestTicket) -> None:
    """Mark the ticket cancelled when the client goes away, so its images are skipped."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            ticket.client_disconnected = True
            ticket.cancelled = True
            return


async def read_images(request: Request) -> list[ImageInput]:
    """Read images from a multipart form, a JSON body of base64 strings, or a raw image body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _read_multipart(request)
    if media_type == "application/json":
        return _read_json(await request.body())
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        return [ImageInput(await request.body(), request.headers.get("x-filename"))]
    raise _unsupported_media_type(media_type)


def _unsupported_media_type(media_type: str) -> FxServeError:
    return UnsupportedMediaTypeError(
        f"content type {media_type or '(none)'!r} is not supported; send multipart/form-data with files in the field 'images', "
        "application/json {\"images\": [base64, ...]}, or one raw image with an image/* content type"
    )


async def _read_multipart(request: Request) -> list[ImageInput]:
    limit = request.app.state.engine.settings.max_images_per_request
    try:
        form = await request.form(max_files=limit + 1, max_fields=limit + 16)
    except FxServeError:
        raise
    except Exception as exc:  # python-multipart raises several types for malformed bodies
        detail = str(getattr(exc, "detail", exc))
        if "Too many files" in detail:
            raise PayloadTooLargeError(
                f"the request has more than {limit} images, the limit (FXSERVE_MAX_IMAGES_PER_REQUEST); split it"
            ) from None
        raise BadRequestError(f"the multipart body could not be parsed: {detail}") from None
    images: list[ImageInput] = []
    try:
        entries = form.getlist("images")
        if not entries:
            fields = ", ".join(sorted(set(form.keys()))) or "none"
            raise BadRequestError(f"the multipart body has no field 'images' (fields present: {fields}); send each image as a file in the field 'images'")
        for index, entry in enumerate(entries):
            if not isinstance(entry, UploadFile):
                raise InvalidImageError(f"image {index} in the field 'images' is a text value, not a file; send it as a file part")
            images.append(ImageInput(await entry.read(), entry.filename))
    finally:
        await form.close()
    return images


def _read_json(body: bytes) -> list[ImageInput]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        if isinstance(payload, dict) and "images" in payload:
            found = f"'images' is a JSON {type(payload['images']).__name__}"
        elif isinstance(payload, dict):
            found = f"it has the keys {', '.join(map(show, list(payload)[:10])) or '(none)'}"
        else:
            found = f"it is a JSON {type(payload).__name__}"
        raise BadRequestError(f'the JSON body must be an object {{"images": ["<base64>", ...]}}, but {found}')
    images = []
    for index, item in enumerate(payload["images"]):
        if not isinstance(item, str):
            raise InvalidImageError(f"image {index} is a JSON {type(item).__name__}, not a base64 string")
        images.append(ImageInput(_decode_base64(item, index)))
    return images


def _decode_base64(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    # MIME base64 (the base64 tool, base64.encodebytes) wraps lines; the line breaks carry no data.
    text = "".join(text.split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"image {index} is not valid base64 ({exc}); encode the file with standard base64") from None


async def _encode(function: Callable[..., bytes], *args: Any, size: int) -> bytes:
    if size > _INLINE_ENCODE_MAX_ELEMENTS:
        return await run_in_threadpool(function, *args)
    return function(*args)


def _element_count(outcome: ExtractOutcome) -> int:
    return sum(array.size for result in outcome.results for array in result.values())


def _timed(response: Response, outcome: ExtractOutcome, request: Request) -> Response:
    """Add Server-Timing (decode, queue, inference, total, in ms) and the batch sizes used."""
    started = request.scope.get("state", {}).get("started", time.perf_counter())
    total_ms = (time.perf_counter() - started) * 1000
    response.headers["Server-Timing"] = (
        f"decode;dur={outcome.decode_s * 1000:.2f}, queue;dur={outcome.queue_s * 1000:.2f}, "
        f"inference;dur={outcome.inference_s * 1000:.2f}, total;dur={total_ms:.2f}"
    )
    response.headers["X-Batch-Sizes"] = ",".join(str(size) for size in sorted(set(outcome.batch_sizes)))
    return response
