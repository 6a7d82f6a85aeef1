"""Error responses as the API sends them: the body from the error, the headers it implies,
and how the OpenAPI document declares them (`documented`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match

from qaserve.errors import InvalidRequest, Overloaded, QAServeError, RateLimited, Unauthorized
from qaserve_client.schema import ErrorResponse

HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def error_headers(exc: QAServeError, retry_after: int = 1) -> dict[str, str]:
    """What an error tells HTTP clients beyond its body: when to retry, how to authenticate."""
    if isinstance(exc, (Overloaded, RateLimited)):
        return {"Retry-After": str(exc.retry_after or retry_after)}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def error_response(exc: QAServeError, retry_after: int = 1) -> JSONResponse:
    return JSONResponse(
        exc.to_dict(), status_code=exc.status, headers=error_headers(exc, retry_after)
    )


def allowed_methods(request: Request) -> str | None:
    """Every method of the documented routes at the request's path, for a 405's `Allow`:
    Starlette names only the first route it tried (GET of /v1/documents/{id}, not DELETE)."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):  # into included routers too
        if getattr(route, "include_in_schema", False) and route.methods:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= route.methods
    return ", ".join(sorted(methods)) or None


def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (no route: 404, a method the path lacks: 405) in the API's shape."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
    body = {"type": HTTP_TYPES.get(exc.status_code, "http_error"), "message": str(exc.detail)}
    return JSONResponse({"error": body}, exc.status_code, headers=headers)


# What each error status means, for the OpenAPI document; a route lists those it can answer.
MEANINGS: dict[int, str] = {
    400: "a stage refused its input",
    401: "missing or unknown API key",
    403: "the key may read but not write",
    404: "no such document",
    413: "request body too large",
    415: "the body is not JSON (Content-Type other than application/json)",
    422: "invalid request; `error.field` names the field",
    429: "over the key's rate limit; retry after Retry-After seconds",
    500: "internal error",
    503: "overloaded or starting; retry after Retry-After seconds",
    504: "a stage timed out",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
}


def documented(
    *statuses: int,
    model: type[BaseModel] = ErrorResponse,
    meanings: Mapping[int, str] = MEANINGS,
) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: each error status it can answer, with the error body's schema
    and the headers that come with it (Retry-After, WWW-Authenticate)."""
    return {
        status: {"model": model, "description": meanings[status]}
        | ({"headers": _HEADERS[status]} if status in _HEADERS else {})
        for status in statuses
    }


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
