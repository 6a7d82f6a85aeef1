"""Error responses as the API sends them: the body from the error, the headers it implies."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from qaserve.errors import InvalidRequest, Overloaded, QAServeError, Unauthorized

HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_headers(exc: QAServeError, retry_after: int = 1) -> dict[str, str]:
    """What an error tells HTTP clients beyond its body: when to retry, how to authenticate."""
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after or retry_after)}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def error_response(exc: QAServeError, retry_after: int = 1) -> JSONResponse:
    return JSONResponse(
        exc.to_dict(), status_code=exc.status, headers=error_headers(exc, retry_after)
    )


def validation_error(exc: RequestValidationError) -> QAServeError:
    """The first problem, with its dotted field path (`documents.0.text`)."""
    errors = list(exc.errors())
    first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = list(first.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    kind = first.get("type")
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        message, field = f"malformed JSON: {reason} (at character {loc[0] if loc else 0})", None
    elif kind == "missing" and not loc:
        message, field = "a JSON request body is required", None
    else:
        field = ".".join(str(p) for p in loc) or None
        text = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"{field}: {text}" if field else text
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return InvalidRequest(message, field)
