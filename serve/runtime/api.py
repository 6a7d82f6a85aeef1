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
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import Receive

from qaserve import __version__
from qaserve.config import EngineConfig, ServerConfig
from qaserve.errors import (
    InternalError,
    Overloaded,
    QAServeError,
    as_api_error,
)
from qaserve.limits import Limits, engine_of
from qaserve.pipeline import Event, Pipeline
from qaserve.runtime.keys import KeyCheck, require_keys
from qaserve.runtime.middleware import Admission, BodyLimit, json_body
from qaserve.runtime.responses import documented, error_response, http_error, validation_error
from qaserve_client import sse
from qaserve_client.schema import (
    COLLECTION_PATTERN,
    MAX_COLLECTION_CHARS,
    DocumentOut,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    IngestRequest,
    IngestResponse,
    ModelsResponse,
    Operation,
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


class ClientGone(Exception):
    """The client disconnected while its request was being served: the call was cancelled."""


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects. Once the body is read (BodyLimit replays it),
    the next `receive()` returns `http.disconnect` when the client goes away; a receive that
    fails cannot tell, so it never answers."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:
        await asyncio.Event().wait()


async def _unless_gone(awaitable: Awaitable[T], receive: Receive) -> T:
    """The awaitable, cancelled when the client disconnects first (ClientGone) or when this
    call is cancelled (a timeout); either way the cancellation has reached the stages'
    calls (their tokens are set, qaserve.cancel) before this returns."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})
            if not work.cancelled():
                work.exception()  # retrieved: nobody waits for it any more
    if work not in done:
        raise ClientGone("the client disconnected")
    return work.result()


class _Calls:
    """Backend calls under the configured timeouts, errors mapped to QAServeError.

    A call that times out or whose client disconnects is cancelled, and so is the stages'
    work under it (qaserve.cancel): uvicorn does not cancel a handler whose client went
    away, so a call given the `request` watches for the disconnect itself (under Ray Serve
    the proxy also cancels the Ingress's request).
    """

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg

    async def __call__(
        self,
        op: str,
        awaitable: Awaitable[T],
        bounded: bool = True,
        request: Request | None = None,
    ) -> T:
        """`bounded=False`: the awaitable enforces the op's timeout itself (a write, which
        must decide what happens at the deadline). `request`: cancel the call when its
        client disconnects (ClientGone)."""
        timeout = self.cfg.timeout_for(op)
        if request is not None:
            awaitable = _unless_gone(awaitable, request.receive)
        try:
            return await asyncio.wait_for(awaitable, timeout if bounded else None)
        except (QAServeError, StopAsyncIteration, ClientGone):
            raise
        except Exception as exc:
            raise as_api_error(exc, op, timeout) from exc

    async def events(
        self,
        op: str,
        events: AsyncIterator[Event],
        render: Callable[[AsyncIterator[Event]], AsyncIterator[bytes]] | None = None,
        on_error: Callable[[QAServeError], bytes] | None = None,
        request: Request | None = None,
    ) -> StreamingResponse:
        """A streamed answer: `render` turns the events into the body (default: SSE of each
        event, then `done`), each event under the timeout. An error before the first event is
        an ordinary error response; after it, `on_error`'s chunk (default: an SSE `error`
        event) ends the stream. However it ends, the events' source is closed. `request`:
        the wait for the first event (a beam search sends its tokens at its end) ends when
        the client disconnects; once the response has started, Starlette watches for that."""
        timeout = self.cfg.timeout_for(op)

        async def step(request: Request | None = None) -> Event | None:
            try:
                return await self(op, anext(events), request=request)
            except StopAsyncIteration:
                return None

        try:
            first = await step(request)
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


def sse_doc(*events: str) -> dict[str, Any]:
    """A streamed 200 in the OpenAPI document. Before OpenAPI 3.2's `itemSchema`, the schema
    of `text/event-stream` describes one event: its name and its data (JSON text)."""
    event = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"enum": list(events)},
            "data": {"type": "string", "contentMediaType": "application/json"},
        },
    }
    return {
        "description": 'With `"stream": true`: `text/event-stream` (see the route description).',
        "content": {"text/event-stream": {"schema": event}},
    }


# The error statuses a route can answer, declared per route (each with ErrorResponse):
_KEYED = (401, 429, 500, 503)  # any keyed route: no key, rate limit, crash, overload
_CALL = (400, 504)  # a backend call: a stage refuses its input, or does not answer in time
_BODY = (413, 415, 422)  # a JSON body: too large, not JSON, invalid


_ACCEPTED_DOC = {
    "model": Operation,
    "description": "With `wait=false`: the write goes on; poll the `Location` header's URL.",
    "headers": {"Location": {"description": "/v1/operations/{id}", "schema": {"type": "string"}}},
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


def build_app(
    backend: Pipeline | None, cfg: ServerConfig | None = None, engine: EngineConfig | None = None
) -> FastAPI:
    """The app over the pipeline (any transport); None means "bound later" through
    `app.state.backend` (503 until then). `engine`: the stages' settings, which the cost
    bounds derive from (default: an in-process pipeline's own, else EngineConfig's)."""
    cfg = cfg or ServerConfig()
    limits = Limits.build(cfg, engine or engine_of(backend))
    call = _Calls(cfg)
    keys = KeyCheck(cfg)
    reads, writes = [keys.dependency(write=False)], [keys.dependency(write=True)]
    json_in = [Depends(json_body)]  # after the key: 401 before 415

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
    )
    app.state.backend = backend
    app.state.config = cfg
    app.state.keys = keys  # the key check and rate limiter, for require_keys and tests
    app.state.limits = limits  # the cost bounds (qaserve.limits), checked by every route
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.add_middleware(Admission, limit=cfg.max_ongoing_requests, retry_after=cfg.retry_after_s)

    @app.exception_handler(ClientGone)
    async def on_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": read by nobody

    @app.exception_handler(QAServeError)
    async def on_error(request: Request, exc: QAServeError) -> JSONResponse:
        return error_response(exc, cfg.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        return http_error(request, exc)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(InternalError("internal server error"))

    collection_q = Query(
        None, min_length=1, max_length=MAX_COLLECTION_CHARS, pattern=COLLECTION_PATTERN
    )

    @app.post(
        "/v1/documents",
        response_model=IngestResponse,
        dependencies=[*writes, *json_in],
        tags=["documents"],
        responses={202: _ACCEPTED_DOC, **documented(403, *_KEYED, *_CALL, *_BODY)},
    )
    async def ingest(
        body: IngestRequest,
        request: Request,
        wait: bool = Query(True, description="false: answer 202 at once, the write goes on"),
    ) -> Any:
        """Split, embed and store; a document with an existing id replaces it (idempotent).

        All or nothing: a 504 (or a client that goes away) stops the write before its commit,
        so nothing is written. With `wait=false` (large ingests): 202 with the Operation and
        a `Location` to poll (`GET /v1/operations/{id}`: status, progress, result)."""
        limits.check(body)
        backend = _backend(request)
        if not wait:
            op = await call("ingest", backend.start_ingest(body))
            location = {"Location": f"/v1/operations/{op.id}"}
            return Response(op.model_dump_json(), 202, location, media_type="application/json")
        timeout = cfg.timeout_for("ingest")
        write = backend.ingest(body, timeout)
        return _json(await call("ingest", write, bounded=False, request=request))

    @app.get(
        "/v1/operations/{op_id}",
        response_model=Operation,
        dependencies=writes,
        tags=["documents"],
        responses={
            404: {"model": ErrorResponse, "description": "no such operation (or expired)"},
            **documented(403, 422, *_KEYED, *_CALL),
        },
    )
    async def operation(op_id: str, request: Request) -> Any:
        """A write's status (queued, running, done, failed, cancelled), progress and result;
        the last 256 finished writes are kept."""
        return _json(await call("operation", _backend(request).operation(op_id)))

    @app.get(
        "/v1/documents/{doc_id:path}",
        response_model=DocumentOut,
        dependencies=reads,
        tags=["documents"],
        responses=documented(404, 422, *_KEYED, *_CALL),
    )
    async def get_document(
        doc_id: str, request: Request, collection: str | None = collection_q
    ) -> Any:
        return _json(await call("get_document", _backend(request).get_document(doc_id, collection)))

    @app.delete(
        "/v1/documents/{doc_id:path}",
        status_code=204,
        dependencies=writes,
        tags=["documents"],
        responses=documented(403, 404, 422, *_KEYED, *_CALL),
    )
    async def delete_document(
        doc_id: str, request: Request, collection: str | None = collection_q
    ) -> Response:
        await call("delete_document", _backend(request).delete_document(doc_id, collection))
        return Response(status_code=204)

    @app.post(
        "/v1/retrieve",
        response_model=RetrieveResponse,
        dependencies=[*reads, *json_in],
        tags=["stages"],
        responses=documented(*_KEYED, *_CALL, *_BODY),
    )
    async def retrieve(body: RetrieveRequest, request: Request) -> Any:
        limits.check(body)
        return _json(await call("retrieve", _backend(request).retrieve(body), request=request))

    @app.post(
        "/v1/read",
        response_model=ReadResponse,
        dependencies=[*reads, *json_in],
        tags=["stages"],
        responses=documented(*_KEYED, *_CALL, *_BODY),
    )
    async def read(body: ReadRequest, request: Request) -> Any:
        limits.check(body)
        return _json(await call("read", _backend(request).read(body), request=request))

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        dependencies=[*reads, *json_in],
        tags=["stages"],
        responses={
            200: sse_doc("token", "generated", "done", "error"),
            **documented(*_KEYED, *_CALL, *_BODY),
        },
    )
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """With `"stream": true`, SSE events: `token` (GeneratedToken) per token, then
        `generated` (GenerateResponse), then `done` (`{}`); `error` (ErrorResponse) ends a
        failed stream."""
        limits.check(body)
        backend = _backend(request)
        if body.stream:
            return await call.events("generate", backend.generate_events(body), request=request)
        return _json(await call("generate", backend.generate(body), request=request))

    @app.post(
        "/v1/query",
        response_model=QueryResponse,
        dependencies=[*reads, *json_in],
        tags=["query"],
        responses={
            200: sse_doc("documents", "answers", "token", "answer", "done", "error"),
            **documented(*_KEYED, *_CALL, *_BODY),
        },
    )
    async def query(body: QueryRequest, request: Request) -> Any:
        """Retrieve, read, generate, ensemble. With `"stream": true`, SSE events: `documents`
        (RetrieveResponse), `answers` (ReadResponse; modes that read), `token` (GeneratedToken;
        modes that generate), `answer` (QueryResponse), `done` (`{}`); `error` ends a failed
        stream."""
        limits.check(body)
        backend = _backend(request)
        if body.stream:
            return await call.events("query", backend.query_events(body), request=request)
        return _json(await call("query", backend.query(body), request=request))

    @app.get(
        "/v1/models",
        response_model=ModelsResponse,
        dependencies=reads,
        tags=["ops"],
        responses=documented(*_KEYED, *_CALL),
    )
    async def models(request: Request) -> Any:
        return _json(await call("models", _backend(request).models()))

    @app.get("/healthz", response_model=HealthResponse, tags=["ops"])
    async def healthz() -> Any:
        return HealthResponse()

    @app.get(
        "/readyz",
        response_model=ReadyResponse,
        tags=["ops"],
        responses={503: {"model": ReadyResponse, "description": "not ready: a stage is not up"}},
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
    limits.document(app)  # the bounds in the OpenAPI document
    require_keys(app, keys)  # last: every route above, whoever added it, checks its key
    return app
