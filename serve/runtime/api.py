"""The v1 HTTP API: a FastAPI app over the pipeline (qaserve.pipeline), whichever transport
runs its stages (in-process or Ray handles).

The app owns everything HTTP: validation, keys, body limits, admission, timeouts, error
bodies and SSE; the pipeline owns the query and the stages own the models. Routes look the
pipeline up in `app.state.backend`, so an app can be built before its pipeline exists.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qaserve import __version__
from qaserve.config import ServerConfig
from qaserve.errors import (
    Forbidden,
    InternalError,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    QAServeError,
    Unauthorized,
    as_api_error,
)
from qaserve.pipeline import Event, Pipeline
from qaserve_client import sse
from qaserve_client.schema import (
    DocumentOut,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    IngestRequest,
    IngestResponse,
    ModelsResponse,
    QueryRequest,
    QueryResponse,
    ReadRequest,
    ReadResponse,
    ReadyResponse,
    RetrieveRequest,
    RetrieveResponse,
)

log = logging.getLogger("qaserve.runtime.api")
T = TypeVar("T")


_HTTP_TYPES = {
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


# --- ASGI middleware: run before any parsing ------------------------------------------------


class BodyLimit:
    """413 for bodies over `limit` bytes, by Content-Length or by counting a chunked body.

    The body is read here (FastAPI would read it whole anyway) and replayed to the app, so
    nothing downstream parses a byte of an oversized request.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"request body larger than {self.limit} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(too_large)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await error_response(too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # disconnect notices while streaming
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class Admission:
    """503 + Retry-After beyond `limit` API requests in flight (streams count until done):
    the v1 API and the OpenAI-compatible routes; the page and the probes are not counted."""

    def __init__(self, app: ASGIApp, limit: int, retry_after: int) -> None:
        self.app = app
        self.limit = limit
        self.retry_after = retry_after
        self.ongoing = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/v1/", "/openai/v1/")):
            await self.app(scope, receive, send)
            return
        if self.ongoing >= self.limit:
            busy = Overloaded(f"more than {self.limit} requests in flight; retry later")
            await error_response(busy, self.retry_after)(scope, receive, send)
            return
        self.ongoing += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.ongoing -= 1


# --- keys --------------------------------------------------------------------------------------


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


class KeyCheck:
    def __init__(self, cfg: ServerConfig) -> None:
        self.keys = [(k.key.encode(), k.write) for k in cfg.api_keys]
        self.reads_need_key = cfg.require_key_for_reads

    def check(self, presented: str | None, write: bool) -> None:
        if not self.keys:
            return
        if not presented:
            if write or self.reads_need_key:
                raise Unauthorized(
                    "an API key is required ('Authorization: Bearer KEY' or 'X-API-Key')"
                )
            return
        given = presented.encode()
        # compare_digest against every key: no early exit that would time the match
        matches = [w for k, w in self.keys if hmac.compare_digest(k, given)]
        if not matches:
            raise Unauthorized("unknown API key")
        if write and not any(matches):
            raise Forbidden("this API key may read but not write")

    def dependency(self, write: bool) -> Any:
        async def check(
            bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
            header: str | None = Depends(_key_header),
        ) -> None:
            self.check(bearer.credentials if bearer else header, write)

        return Depends(check)


# --- the app -----------------------------------------------------------------------------------


class _Calls:
    """Backend calls under the configured timeouts, errors mapped to QAServeError."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg

    async def __call__(self, op: str, awaitable: Awaitable[T]) -> T:
        timeout = self.cfg.timeout_for(op)
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except (QAServeError, StopAsyncIteration):
            raise
        except Exception as exc:
            raise as_api_error(exc, op, timeout) from exc

    async def events(
        self,
        op: str,
        events: AsyncIterator[Event],
        render: Callable[[AsyncIterator[Event]], AsyncIterator[bytes]] | None = None,
        on_error: Callable[[QAServeError], bytes] | None = None,
    ) -> StreamingResponse:
        """A streamed answer: `render` turns the events into the body (default: SSE of each
        event, then `done`), each event under the timeout. An error before the first event is
        an ordinary error response; after it, `on_error`'s chunk (default: an SSE `error`
        event) ends the stream. However it ends, the events' source is closed."""
        timeout = self.cfg.timeout_for(op)

        async def step() -> Event | None:
            try:
                return await self(op, anext(events))
            except StopAsyncIteration:
                return None

        try:
            first = await step()
        except BaseException:
            await _aclose(events)
            raise

        async def timed() -> AsyncIterator[Event]:
            item = first
            while item is not None:
                yield item
                item = await step()

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in (render or _sse)(timed()):
                    yield chunk
            except Exception as exc:
                yield (on_error or _sse_error)(as_api_error(exc, op, timeout))
            finally:
                # Shielded: after a client disconnects the scope is cancelled, and an
                # unshielded await would be cancelled before the backend stops generating.
                with anyio.CancelScope(shield=True):
                    await _aclose(events)

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def _sse(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    async for name, payload in events:
        yield sse.encode(name, payload.model_dump_json())
    yield sse.encode("done", "{}")


def _sse_error(error: QAServeError) -> bytes:
    return sse.encode("error", json.dumps(error.to_dict()))


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            log.debug("closing a stream failed", exc_info=True)


_SSE_DOC = {
    "description": 'With `"stream": true`: `text/event-stream` (see the route description).',
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (401, "missing or unknown API key"),
        (403, "the key may not write"),
        (413, "request body too large"),
        (422, "invalid request"),
        (503, "overloaded; retry after Retry-After seconds"),
        (504, "a stage timed out"),
    )
}


def _json(body: BaseModel) -> Response:
    """The answer as JSON, as it is: the pipeline built it from the same models the routes
    declare, so FastAPI's second validation and encoding pass (response_model) is skipped."""
    return Response(body.model_dump_json(), media_type="application/json")


def _backend(request: Request) -> Pipeline:
    backend = request.app.state.backend
    if backend is None:
        raise Overloaded("the server is starting")
    return backend


def build_app(backend: Pipeline | None, cfg: ServerConfig | None = None) -> FastAPI:
    """The app over the pipeline (any transport); None means "bound later" through
    `app.state.backend` (503 until then)."""
    cfg = cfg or ServerConfig()
    call = _Calls(cfg)
    keys = KeyCheck(cfg)
    reads, writes = [keys.dependency(write=False)], [keys.dependency(write=True)]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        startup = getattr(app.state.backend, "startup", None)
        if startup is not None:
            await startup()
        yield

    app = FastAPI(
        title="qaserve",
        version=__version__,
        description="Question answering over your documents: retriever, reader, generator.",
        lifespan=lifespan,
        responses=_ERRORS,
    )
    app.state.backend = backend
    app.state.config = cfg
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.add_middleware(Admission, limit=cfg.max_ongoing_requests, retry_after=cfg.retry_after_s)

    @app.exception_handler(QAServeError)
    async def on_error(request: Request, exc: QAServeError) -> JSONResponse:
        return error_response(exc, cfg.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        body = {"type": _HTTP_TYPES.get(exc.status_code, "http_error"), "message": str(exc.detail)}
        return JSONResponse({"error": body}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(InternalError("internal server error"))

    collection_q = Query(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")

    @app.post(
        "/v1/documents", response_model=IngestResponse, dependencies=writes, tags=["documents"]
    )
    async def ingest(body: IngestRequest, request: Request) -> Any:
        """Split, embed and store; a document with an existing id replaces it (idempotent)."""
        return _json(await call("ingest", _backend(request).ingest(body)))

    @app.get(
        "/v1/documents/{doc_id:path}",
        response_model=DocumentOut,
        dependencies=reads,
        tags=["documents"],
    )
    async def get_document(
        doc_id: str, request: Request, collection: str | None = collection_q
    ) -> Any:
        return _json(await call("get_document", _backend(request).get_document(doc_id, collection)))

    @app.delete(
        "/v1/documents/{doc_id:path}", status_code=204, dependencies=writes, tags=["documents"]
    )
    async def delete_document(
        doc_id: str, request: Request, collection: str | None = collection_q
    ) -> Response:
        await call("delete_document", _backend(request).delete_document(doc_id, collection))
        return Response(status_code=204)

    @app.post("/v1/retrieve", response_model=RetrieveResponse, dependencies=reads, tags=["stages"])
    async def retrieve(body: RetrieveRequest, request: Request) -> Any:
        return _json(await call("retrieve", _backend(request).retrieve(body)))

    @app.post("/v1/read", response_model=ReadResponse, dependencies=reads, tags=["stages"])
    async def read(body: ReadRequest, request: Request) -> Any:
        return _json(await call("read", _backend(request).read(body)))

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        dependencies=reads,
        tags=["stages"],
        responses={200: _SSE_DOC},
    )
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """With `"stream": true`, SSE events: `token` (GeneratedToken) per token, then
        `generated` (GenerateResponse), then `done` (`{}`); `error` (ErrorResponse) ends a
        failed stream."""
        backend = _backend(request)
        if body.stream:
            return await call.events("generate", backend.generate_events(body))
        return _json(await call("generate", backend.generate(body)))

    @app.post(
        "/v1/query",
        response_model=QueryResponse,
        dependencies=reads,
        tags=["query"],
        responses={200: _SSE_DOC},
    )
    async def query(body: QueryRequest, request: Request) -> Any:
        """Retrieve, read, generate, ensemble. With `"stream": true`, SSE events: `documents`
        (RetrieveResponse), `answers` (ReadResponse; modes that read), `token` (GeneratedToken;
        modes that generate), `answer` (QueryResponse), `done` (`{}`); `error` ends a failed
        stream."""
        backend = _backend(request)
        if body.stream:
            return await call.events("query", backend.query_events(body))
        return _json(await call("query", backend.query(body)))

    @app.get("/v1/models", response_model=ModelsResponse, dependencies=reads, tags=["ops"])
    async def models(request: Request) -> Any:
        return _json(await call("models", _backend(request).models()))

    @app.get("/healthz", response_model=HealthResponse, tags=["ops"])
    async def healthz() -> Any:
        return HealthResponse()

    @app.get(
        "/readyz",
        response_model=ReadyResponse,
        tags=["ops"],
        responses={503: {"model": ReadyResponse}},
    )
    async def readyz(request: Request) -> Any:
        try:
            stages = await call("ready", _backend(request).ready())
        except QAServeError as exc:
            log.warning("readiness check failed: %s", exc.message)
            stages = {}
        ready = bool(stages) and all(stages.values())
        body = ReadyResponse(ready=ready, stages=stages)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    # Modules that import this one register their routes here: local imports.
    from qaserve.runtime import openai_routes, playground

    openai_routes.register(app, call, reads)  # /openai/v1: OpenAI's chat API
    playground.register(app)  # the page at `/` (static files)
    return app
