"""The v1 HTTP API: a FastAPI app over the pipeline (qaserve.pipeline), whichever transport
runs its stages (in-process or Ray handles).

The app owns everything HTTP: validation, keys, body limits, admission, timeouts, error
bodies and SSE; the pipeline owns the query and the stages own the models. Routes look the
pipeline up in `app.state.backend`, so an app can be built before its pipeline exists.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from qaserve import __version__
from qaserve.config import ServerConfig
from qaserve.errors import (
    InternalError,
    Overloaded,
    QAServeError,
    as_api_error,
)
from qaserve.pipeline import Event, Pipeline
from qaserve.runtime.keys import KeyCheck
from qaserve.runtime.middleware import Admission, BodyLimit
from qaserve.runtime.responses import HTTP_TYPES, error_response, validation_error
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
        body = {"type": HTTP_TYPES.get(exc.status_code, "http_error"), "message": str(exc.detail)}
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
