"""Errors that carry their HTTP meaning, so the stages, the CLI and the server agree on them.

Each class's `type` is a name of the wire vocabulary `qaserve_client.errors.ERROR_TYPES`, and
its status is read from there: the server and the SDK cannot disagree on what a type means.
`as_api_error` is the one mapping from any exception a stage raises to what a caller sees,
whichever transport (in-process or Ray) the stage ran behind.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from qaserve_client.errors import ERROR_TYPES

log = logging.getLogger("qaserve.errors")


class QAServeError(Exception):
    """Base error: `type` and `status` are what the HTTP API reports."""

    type: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.status = ERROR_TYPES[cls.type]  # a KeyError here names a type missing on the wire

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles a stage's exception to the caller: keep the field across the hop.
        return (type(self), (self.message, self.field))

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.field:
            body["field"] = self.field
        return {"error": body}


class BadRequest(QAServeError):
    type = "bad_request"


class Unauthorized(QAServeError):
    type = "unauthorized"


class Forbidden(QAServeError):
    type = "forbidden"


class PayloadTooLarge(QAServeError):
    type = "payload_too_large"


class UnsupportedMediaType(QAServeError):
    type = "unsupported_media_type"


class InvalidRequest(QAServeError):
    type = "validation_error"


class InternalError(QAServeError):
    type = "internal_error"


class DocumentNotFound(QAServeError):
    type = "not_found"


class ConfigError(QAServeError):
    """The engine was configured in a way that cannot work (e.g. no reader model named)."""

    type = "config_error"


class Overloaded(QAServeError):
    type = "overloaded"

    def __init__(
        self, message: str, field: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message, field)
        self.retry_after = retry_after


class RateLimited(QAServeError):
    """The caller's key (or address) is over its rate limit; `retry_after` says when a request
    will pass again."""

    type = "rate_limited"

    def __init__(
        self, message: str, field: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message, field)
        self.retry_after = retry_after


class StageTimeout(QAServeError):
    type = "timeout"


def as_api_error(exc: BaseException, op: str, timeout: float | None = None) -> QAServeError:
    """Any exception from a stage or the pipeline as the error the client sees.

    A ValueError is the stage refusing its input (400), a TimeoutError a stage that did not
    answer in time (504); anything else is logged and reported as a 500 without details.
    """
    if isinstance(exc, QAServeError):
        return exc
    if isinstance(exc, TimeoutError):
        limit = f" within {timeout:g} s" if timeout is not None else " in time"
        return StageTimeout(f"{op} did not answer{limit}")
    if isinstance(exc, ValueError):
        return BadRequest(str(exc) or f"{op}: invalid input")
    log.error("%s failed", op, exc_info=exc)
    return InternalError("internal server error")
