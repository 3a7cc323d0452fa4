"""Domain exceptions and the HTTP status each one maps to.

Every error a client can cause is a subclass of ``FxServeError``; ``api.py`` turns
them into JSON responses in one exception handler. Messages name the bad value, the
valid choices and what to do, because they are shown to clients verbatim.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "FxServeError",
    "ConfigError",
    "WeightsUnavailableError",
    "CheckpointMismatchError",
    "BadRequestError",
    "InvalidImageError",
    "PayloadTooLargeError",
    "UnsupportedMediaTypeError",
    "RequestTimeoutError",
    "ModelNotFoundError",
    "InvalidParameterError",
    "UnauthorizedError",
    "NotReadyError",
    "OverloadedError",
    "DeadlineExceededError",
    "OutOfMemoryError",
    "ClientDisconnectedError",
    "closest",
    "show",
]


class FxServeError(Exception):
    """Base class of errors that carry an HTTP status and a machine-readable code."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        # The label of fxserve_rejected_requests_total: a finer cause than ``code``.
        self.reason = reason or self.code


class ConfigError(FxServeError):
    """A config entry is invalid; raised at start-up and by ``check``.

    The message starts with the model and the field; callers that know the file
    put its path in front.
    """

    code = "invalid_config"

    def __init__(self, model: str | None, field: str | None, problem: str, fix: str = "") -> None:
        where = []
        if model is not None:
            where.append(f"model '{model}'")
        if field is not None:
            where.append(f"field '{field}'")
        message = f"{', '.join(where)}: {problem}" if where else problem
        if fix:
            message += f". {fix}"
        super().__init__(message)
        self.model = model
        self.field = field


class WeightsUnavailableError(ConfigError):
    """Pretrained weights are not cached and could not be downloaded."""

    code = "weights_unavailable"


class CheckpointMismatchError(ConfigError):
    """A checkpoint's keys do not fit the architecture."""

    code = "checkpoint_mismatch"


class BadRequestError(FxServeError):
    status_code = 400
    code = "bad_request"


class InvalidImageError(BadRequestError):
    """One image of a request cannot be decoded; the message names the image."""

    code = "invalid_image"


class UnsupportedMediaTypeError(FxServeError):
    status_code = 415
    code = "unsupported_media_type"


class PayloadTooLargeError(FxServeError):
    status_code = 413
    code = "payload_too_large"


class RequestTimeoutError(FxServeError):
    status_code = 408
    code = "request_timeout"


class UnauthorizedError(FxServeError):
    status_code = 401
    code = "unauthorized"


class ModelNotFoundError(FxServeError):
    status_code = 404
    code = "model_not_found"


class InvalidParameterError(FxServeError):
    status_code = 422
    code = "invalid_parameter"


class NotReadyError(FxServeError):
    status_code = 503
    code = "not_ready"


class OverloadedError(FxServeError):
    status_code = 429
    code = "overloaded"


class DeadlineExceededError(FxServeError):
    status_code = 504
    code = "deadline_exceeded"


class OutOfMemoryError(FxServeError):
    status_code = 507
    code = "out_of_memory"


class ClientDisconnectedError(FxServeError):
    """The client closed the connection before its images ran, so no response is sent."""

    status_code = 499
    code = "client_disconnected"


def show(value: str, limit: int = 80) -> str:
    """Quote a client-supplied value for a message or a log line: escaped and truncated."""
    if len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    return repr(value)


def closest(value: str, choices: Iterable[str], limit: int = 5) -> list[str]:
    """Return up to ``limit`` choices that look like ``value``, best first."""
    choices = list(choices)
    matches = difflib.get_close_matches(value, choices, n=limit, cutoff=0.5)
    if len(matches) < limit:
        prefixed = [c for c in choices if c.startswith(value) and c not in matches]
        matches.extend(prefixed[: limit - len(matches)])
    return matches
