"""The one place where exceptions become HTTP responses.

Domain errors keep their message (written for clients). Anything else is a 500
that shows only the request id; the log has the traceback under the same id.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .encoding import dumps
from .errors import FxServeError, show

__all__ = ["error_response", "install_error_handlers", "model_label"]

logger = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def model_label(scope: dict, model_names: list[str]) -> str:
    """Return the configured model a request names, or "" so metric labels stay a closed set."""
    requested = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("model", [""])[0]
    if requested in model_names:
        return requested
    path_params = scope.get("path_params") or {}
    if path_params.get("name") in model_names:
        return path_params["name"]
    if not requested and len(model_names) == 1 and scope["path"] in ("/extract", "/embed"):
        return model_names[0]
    return ""


def error_response(status: int, code: str, message: str, request_id: str | None, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return Response(dumps(body), status_code=status, media_type="application/json", headers=headers)


def _record_reason(request: Request, reason: str) -> None:
    """Leave the rejection reason for ObservabilityMiddleware, which counts every error response."""
    request.scope.setdefault("state", {})["error_reason"] = reason


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


async def _handle_domain_error(request: Request, exc: FxServeError) -> Response:
    level = logging.WARNING if exc.status_code >= 500 else logging.INFO
    # The message may quote client input: %r escapes newlines so it cannot forge log lines.
    logger.log(level, "request %s rejected with %d %s: %r", _request_id(request), exc.status_code, exc.code, exc.message[:2000])
    _record_reason(request, exc.reason)
    return error_response(exc.status_code, exc.code, exc.message, _request_id(request), exc.headers)


async def _handle_validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{location}: {error.get('msg')} (received {show(str(error.get('input')))})")
    _record_reason(request, "invalid_parameter")
    return error_response(422, "invalid_parameter", "; ".join(problems), _request_id(request))


async def _handle_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    _record_reason(request, code)
    return error_response(exc.status_code, code, str(exc.detail), _request_id(request), getattr(exc, "headers", None))


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    request_id = _request_id(request)
    _record_reason(request, "internal_error")
    logger.error("request %s failed: %s %s", request_id, request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", f"internal server error; report request id {request_id}", request_id)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FxServeError, _handle_domain_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)
    app.add_exception_handler(Exception, _handle_unexpected)
