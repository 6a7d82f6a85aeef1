"""The SDK's exceptions: one class per HTTP error family, all carrying the server's error body.

The server answers every error as `{"error": {"type", "message", "field"?}}`; these classes
keep those fields so callers can branch on `status`/`type` or catch a subclass.
"""

from __future__ import annotations

import json
from typing import Any


class QAServeClientError(Exception):
    """Base of every error the SDK raises."""


class QAServeConnectionError(QAServeClientError):
    """No HTTP answer: the server could not be reached or the connection broke."""


class QAServeTimeout(QAServeConnectionError):
    """The client's own timeout ran out (the server's stage timeout is `StageTimeout`)."""


class QAServeHTTPError(QAServeClientError):
    status: int = 0

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {type}: {message}" + (f" (field {field!r})" if field else ""))
        self.status = status
        self.type = type
        self.message = message
        self.field = field
        self.retry_after = retry_after


class BadRequest(QAServeHTTPError):
    status = 400


class Unauthorized(QAServeHTTPError):
    status = 401


class Forbidden(QAServeHTTPError):
    status = 403


class NotFound(QAServeHTTPError):
    status = 404


class PayloadTooLarge(QAServeHTTPError):
    status = 413


class ValidationError(QAServeHTTPError):
    status = 422


class RateLimited(QAServeHTTPError):
    """Over the key's rate limit: `retry_after` seconds until a request passes (the SDK's
    Retry waits that long for idempotent calls, as for 503)."""

    status = 429


class ServerError(QAServeHTTPError):
    status = 500


class Overloaded(ServerError):
    status = 503


class StageTimeout(ServerError):
    status = 504


# The error vocabulary of the wire protocol: every `error.type` the server sends, with its
# HTTP status. The server's exceptions (qaserve.errors) are declared from this table, and
# errors inside an SSE stream, which come without a status, are mapped back through it.
ERROR_TYPES: dict[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "validation_error": 422,
    "rate_limited": 429,
    "internal_error": 500,
    "config_error": 500,
    "overloaded": 503,
    "timeout": 504,
}

_BY_STATUS: dict[int, type[QAServeHTTPError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        PayloadTooLarge,
        ValidationError,
        RateLimited,
        ServerError,
        Overloaded,
        StageTimeout,
    )
}


def error_from_body(
    status: int | None, body: Any, retry_after: float | None = None
) -> QAServeHTTPError:
    """The exception for a decoded error body; `status` None means "from the error type"."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {"type": "http_error", "message": str(body)[:500]}
    type_ = str(detail.get("type") or "http_error")
    if status is None:
        status = ERROR_TYPES.get(type_, 500)
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else QAServeHTTPError)
    return cls(status, type_, str(detail.get("message", "")), detail.get("field"), retry_after)


def error_from_response(status: int, content: bytes, retry_after: float | None) -> QAServeHTTPError:
    try:
        body: Any = json.loads(content)
    except ValueError:
        body = content.decode("utf-8", "replace")
    return error_from_body(status, body, retry_after)
