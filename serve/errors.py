"""Errors that carry their HTTP meaning, so the engine, the CLI and the server agree on them."""

from __future__ import annotations


class QAServeError(Exception):
    """Base error: `type` and `status` are what the HTTP API reports."""

    type = "internal_error"
    status = 500

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        body: dict = {"type": self.type, "message": self.message}
        if self.field:
            body["field"] = self.field
        return {"error": body}


class BadRequest(QAServeError):
    type = "bad_request"
    status = 400


class Unauthorized(QAServeError):
    type = "unauthorized"
    status = 401


class Forbidden(QAServeError):
    type = "forbidden"
    status = 403


class PayloadTooLarge(QAServeError):
    type = "payload_too_large"
    status = 413


class InvalidRequest(QAServeError):
    type = "validation_error"
    status = 422


class InternalError(QAServeError):
    type = "internal_error"
    status = 500


class DocumentNotFound(QAServeError):
    type = "not_found"
    status = 404


class ConfigError(QAServeError):
    """The engine was configured in a way that cannot work (e.g. no reader model named)."""

    type = "config_error"
    status = 500


class Overloaded(QAServeError):
    type = "overloaded"
    status = 503


class StageTimeout(QAServeError):
    type = "timeout"
    status = 504
