"""ASGI middleware: request ids, metrics, bearer-token auth, request body limits.

They are plain ASGI callables rather than ``BaseHTTPMiddleware`` so they add no
task or copy per request and never buffer the body.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Iterable

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import PayloadTooLargeError, RequestTimeoutError
from .http_errors import error_response, model_label
from .metrics import Metrics

__all__ = ["ObservabilityMiddleware", "AuthMiddleware", "BodyLimitMiddleware", "OPEN_PATHS"]

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class ObservabilityMiddleware:
    """Assign a request id and record request count and latency by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics, model_names: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.model_names = list(model_names)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            endpoint = _route_template(scope)
            model = model_label(scope, self.model_names)
            if endpoint != "/metrics":
                self.metrics.requests.labels(endpoint=endpoint, model=model, status=str(status)).inc()
                self.metrics.request_duration.labels(endpoint=endpoint).observe(time.perf_counter() - started)
            if status >= 400:
                reason = state.get("error_reason") or f"http_{status}"
                self.metrics.rejected.labels(model=model, reason=reason).inc()

def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID.match(text) else None
    return None


def _route_template(scope: Scope) -> str:
    app = scope.get("app")
    for route in getattr(app, "routes", ()):
        match, _ = route.matches(scope)
        # PARTIAL: the path matches but not the method (a 405).
        if match in (Match.FULL, Match.PARTIAL):
            return getattr(route, "path", "unmatched")
    return "unmatched"


class AuthMiddleware:
    """Require ``Authorization: Bearer <key>`` on every path except health, readiness and metrics."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        # Compare against every key so the time taken does not reveal which one matched.
        matched = False
        for key in self.api_keys:
            matched |= token is not None and hmac.compare_digest(token, key)
        if matched:
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id")
        scope.setdefault("state", {})["error_reason"] = "unauthorized"
        message = "missing or invalid API key; send 'Authorization: Bearer <key>'"
        response = error_response(401, "unauthorized", message, request_id, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
    return None


class BodyLimitMiddleware:
    """Reject bodies over ``max_body_bytes`` while reading, and uploads that stall.

    A declared Content-Length over the limit is rejected before any byte is read.
    Each body chunk must arrive within ``read_timeout_s`` and the whole body within
    ``total_timeout_s``. Once the body is complete, receive is no longer timed,
    because the app then waits on it for the client's disconnect.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, read_timeout_s: float, total_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.total_timeout_s = total_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            request_id = scope.get("state", {}).get("request_id")
            scope.setdefault("state", {})["error_reason"] = "body_too_large"
            message = f"the request body is {declared} bytes, more than the limit of {self.max_body_bytes} (FXSERVE_MAX_BODY_BYTES); send fewer or smaller images"
            await error_response(413, "payload_too_large", message, request_id, {"Connection": "close"})(scope, receive, send)
            return

        received = 0
        body_complete = False
        body_deadline = time.monotonic() + self.total_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:
                return await receive()
            remaining_s = body_deadline - time.monotonic()
            timeout_s = min(self.read_timeout_s, remaining_s)
            try:
                message = await asyncio.wait_for(receive(), timeout=max(timeout_s, 0.001))
            except TimeoutError:
                if timeout_s < self.read_timeout_s:
                    reason = f"the request body took longer than {self.total_timeout_s} s to upload (FXSERVE_REQUEST_TIMEOUT_S)"
                else:
                    reason = f"the client sent no body data for {self.read_timeout_s} s (FXSERVE_BODY_READ_TIMEOUT_S)"
                raise RequestTimeoutError(reason) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise PayloadTooLargeError(f"the request body is more than the limit of {self.max_body_bytes} bytes (FXSERVE_MAX_BODY_BYTES); send fewer or smaller images")
                body_complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
