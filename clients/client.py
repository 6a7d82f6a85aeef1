"""The qaserve Python SDK: `Client` and `AsyncClient` with the same methods and typed answers.

Each API method is written once, as a function that turns arguments into a `Call` (method,
path, body, how to read the answer, whether a retry is safe); the two clients only differ in
how they send it. Needs httpx and pydantic, nothing of the server's.

    with Client("http://127.0.0.1:8000", api_key="...") as qa:
        qa.ingest([{"id": "r1", "text": "Battery lasts ten hours.", "meta": {"item_id": "B01"}}])
        print(qa.query("How long does the battery last?", filters={"item_id": "B01"}).answer.text)
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import inspect
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from qaserve_client import __version__
from qaserve_client.errors import (
    QAServeConnectionError,
    QAServeTimeout,
    error_from_body,
    error_from_response,
)
from qaserve_client.schema import (
    DocumentIn,
    DocumentOut,
    Filters,
    GeneratedToken,
    GenerateResponse,
    HealthResponse,
    IngestResponse,
    ModelInfo,
    ModelsResponse,
    Operation,
    QueryMode,
    QueryResponse,
    ReadResponse,
    ReadyResponse,
    RetrievalMode,
    RetrieveResponse,
)
from qaserve_client.sse import ServerSentEvent, SSEDecoder

__all__ = ["AsyncClient", "Client", "Retry"]

P = ParamSpec("P")
T = TypeVar("T")
ModelT = TypeVar("ModelT", bound=BaseModel)
QueryEvent = tuple[str, BaseModel]
DocumentLike = DocumentIn | BaseModel | Mapping[str, Any] | str
DEFAULT_URL = "http://127.0.0.1:8000"
_DONE = object()


# --- one description of each call ----------------------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    idempotent: bool = True  # safe to send twice: may be retried
    answers: tuple[int, ...] = ()  # error statuses that are answers, not errors (/readyz)
    events: Callable[[ServerSentEvent], Any] | None = None  # set for SSE calls

    def streaming(self, events: Callable[[ServerSentEvent], Any]) -> Call[Any]:
        return replace(self, json={**(self.json or {}), "stream": True}, events=events)


def _model(cls: type[ModelT]) -> Callable[[httpx.Response], ModelT]:
    return lambda response: cls.model_validate_json(response.content)


def _body(**fields: Any) -> dict[str, Any]:
    """Omit what the caller left unset, so the server's defaults apply."""
    return {k: v for k, v in fields.items() if v is not None}


def _document_in(doc: DocumentLike) -> dict[str, Any]:
    if isinstance(doc, str):
        return {"text": doc}
    if isinstance(doc, BaseModel):
        return doc.model_dump(mode="json", exclude_none=True)
    return dict(doc)


def _read_document(doc: DocumentLike) -> dict[str, Any]:
    """id/text/score of anything document-shaped: a retrieve() hit, a dict, a plain string."""
    if isinstance(doc, str):
        return {"text": doc}
    fields = doc.model_dump(mode="json") if isinstance(doc, BaseModel) else doc
    return {k: fields[k] for k in ("id", "text", "score") if fields.get(k) is not None}


def _ingest(
    documents: Sequence[DocumentLike], collection: str | None = None, wait: bool = True
) -> Call[Any]:
    """Store documents (split into passages and embedded); an existing id is replaced. All
    or nothing: a timeout (504) means nothing was written.

    `wait=False` (large ingests): the server answers at once with an `Operation` to poll
    (`operation(id)`, or `wait_operation(op)` until it lands). Retried on 503 only when
    every document has an id: only then is a repeat harmless.
    """
    docs = [_document_in(d) for d in documents]
    return Call(
        "POST",
        "/v1/documents",
        _ingested,
        json=_body(collection=collection, documents=docs),
        params=None if wait else {"wait": "false"},
        idempotent=all(d.get("id") for d in docs),
    )


def _ingested(response: httpx.Response) -> IngestResponse | Operation:
    if response.status_code == 202:
        return Operation.model_validate_json(response.content)
    return IngestResponse.model_validate_json(response.content)


def _operation(op_id: str) -> Call[Operation]:
    """A write started with `ingest(..., wait=False)`: status, progress, result or error."""
    return Call("GET", "/v1/operations/" + quote(op_id, safe=""), _model(Operation))


def _finished(op: Operation) -> Operation | None:
    """The operation if it finished well; its error raised if it failed or was cancelled."""
    if op.status == "done":
        return op
    if op.error is not None and op.finished:
        raise error_from_body(None, {"error": op.error.model_dump()})
    return None


def _wait_expired(op: Operation, timeout: float) -> QAServeTimeout:
    return QAServeTimeout(f"operation {op.id} still {op.status} after {timeout:g} s")


def _document_path(doc_id: str) -> str:
    return "/v1/documents/" + quote(doc_id, safe="")


def _get_document(doc_id: str, collection: str | None = None) -> Call[DocumentOut]:
    """The stored document (its text re-joined from its passages); NotFound if absent."""
    params = _body(collection=collection)
    return Call("GET", _document_path(doc_id), _model(DocumentOut), params=params)


def _delete_document(doc_id: str, collection: str | None = None) -> Call[None]:
    """Remove a document and its passages; NotFound if absent."""
    params = _body(collection=collection)
    return Call("DELETE", _document_path(doc_id), lambda _: None, params=params)


def _retrieve(
    query: str,
    top_k: int = 5,
    filters: Filters | None = None,
    collection: str | None = None,
    retrieval: RetrievalMode | None = None,
) -> Call[RetrieveResponse]:
    """The top_k passages for a query; `filters` match metadata ({"item_id": "B01"})."""
    body = _body(
        query=query, top_k=top_k, filters=filters, collection=collection, retrieval=retrieval
    )
    return Call("POST", "/v1/retrieve", _model(RetrieveResponse), json=body)


def _read(
    question: str,
    documents: Sequence[DocumentLike],
    top_k: int = 3,
    max_answer_len: int | None = None,
    handle_impossible_answer: bool | None = None,
) -> Call[ReadResponse]:
    """Extractive answer spans from the given documents (e.g. retrieve(...).documents)."""
    body = _body(
        question=question,
        documents=[_read_document(d) for d in documents],
        top_k=top_k,
        max_answer_len=max_answer_len,
        handle_impossible_answer=handle_impossible_answer,
    )
    return Call("POST", "/v1/read", _model(ReadResponse), json=body)


def _generate(
    question: str,
    documents: Sequence[DocumentLike],
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
) -> Call[GenerateResponse]:
    """RAG-Token generation conditioned on the given documents (weighted by their scores)."""
    body = _body(
        question=question,
        documents=[_read_document(d) for d in documents],
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
    )
    return Call("POST", "/v1/generate", _model(GenerateResponse), json=body)


def _query(
    question: str,
    mode: QueryMode | None = None,
    top_k_retriever: int | None = None,
    top_k_reader: int | None = None,
    filters: Filters | None = None,
    collection: str | None = None,
    retrieval: RetrievalMode | None = None,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    max_answer_len: int | None = None,
) -> Call[QueryResponse]:
    """The whole graph: retrieve, read and/or generate, then one final answer. Settings
    left None are the server's configured values."""
    body = _body(
        question=question,
        mode=mode,
        top_k_retriever=top_k_retriever,
        top_k_reader=top_k_reader,
        filters=filters,
        collection=collection,
        retrieval=retrieval,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        max_answer_len=max_answer_len,
    )
    return Call("POST", "/v1/query", _model(QueryResponse), json=body)


def _models() -> Call[list[ModelInfo]]:
    """Each stage's model, format, size and device."""
    return Call("GET", "/v1/models", lambda r: ModelsResponse.model_validate_json(r.content).models)


def _health() -> Call[HealthResponse]:
    """Liveness: the server process answers."""
    return Call("GET", "/healthz", _model(HealthResponse))


def _ready() -> Call[ReadyResponse]:
    """Readiness of every stage; a not-ready server is an answer here, not an error."""
    return Call("GET", "/readyz", _model(ReadyResponse), answers=(503,))


# --- SSE event decoding ----------------------------------------------------------------------

_QUERY_EVENTS: dict[str, type[BaseModel]] = {
    "documents": RetrieveResponse,
    "answers": ReadResponse,
    "token": GeneratedToken,
    "answer": QueryResponse,
}


def _query_event(event: ServerSentEvent) -> QueryEvent | None:
    """(name, payload) for `documents`, `answers`, `token`, `answer`; unknown names skipped."""
    cls = _QUERY_EVENTS.get(event.event)
    return (event.event, cls.model_validate_json(event.data)) if cls else None


def _token_event(event: ServerSentEvent) -> GeneratedToken | None:
    """A GeneratedToken per `token` event; the closing `generated` summary is skipped."""
    return GeneratedToken.model_validate_json(event.data) if event.event == "token" else None


def _stream_items(call: Call[Any], decoder: SSEDecoder, text: str) -> list[Any]:
    """What a chunk of the stream yields: decoded items, then `_DONE` if `done` came.

    `error` raises the error it carries; events the call does not know are skipped.
    """
    assert call.events is not None
    items: list[Any] = []
    for event in decoder.feed(text):
        if event.event == "done":
            return [*items, _DONE]
        if event.event == "error":
            try:
                body = json.loads(event.data)
            except ValueError:
                body = event.data
            raise error_from_body(None, body)
        item = call.events(event)
        if item is not None:
            items.append(item)
    return items


# --- retries -----------------------------------------------------------------------------------


_NOT_RETRIED = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with jitter for idempotent calls, on 429/503 and broken connections.

    A Retry-After header sets the wait; one longer than `max_delay` is not waited for: the
    error is raised with its `retry_after` for the caller to decide.
    """

    attempts: int = 3  # retries after the first try
    backoff: float = 0.25
    max_delay: float = 30.0
    statuses: frozenset[int] = frozenset({429, 503})

    def _backoff(self, attempt: int) -> float:
        return min(self.max_delay, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)

    def after_response(self, call: Call[Any], attempt: int, response: httpx.Response) -> float:
        """Seconds to wait before the next try; raises the response's error if none."""
        retry_after = _retry_after(response.headers.get("retry-after"))
        error = error_from_response(response.status_code, response.content, retry_after)
        if not (
            call.idempotent and attempt < self.attempts and response.status_code in self.statuses
        ):
            raise error
        if retry_after is None:
            return self._backoff(attempt)
        if retry_after > self.max_delay:
            raise error
        return retry_after

    def after_exception(self, call: Call[Any], attempt: int, exc: httpx.TransportError) -> float:
        if call.idempotent and attempt < self.attempts and not isinstance(exc, _NOT_RETRIED):
            return self._backoff(attempt)
        if isinstance(exc, httpx.TimeoutException):
            raise QAServeTimeout(f"{call.method} {call.path}: timed out ({exc})") from exc
        raise QAServeConnectionError(f"{call.method} {call.path}: {exc!r}") from exc


def _headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": f"qaserve-client/{__version__}", **(extra or {})}
    api_key = api_key if api_key is not None else os.environ.get("QASERVE_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _unfinished(call: Call[Any]) -> QAServeConnectionError:
    return QAServeConnectionError(f"{call.method} {call.path}: the stream ended before 'done'")


# --- methods: each Call above, bound to both clients ---------------------------------------------


def _signed(
    method: Callable[..., Any], spec: Callable[..., Any], name: str, doc: str | None
) -> Any:
    """Give `method` the spec's name, doc and parameters (plus self) for help() and IDEs."""
    functools.update_wrapper(method, spec)
    function: Any = method  # a plain function: the attributes below are its own to set
    del function.__wrapped__
    signature = inspect.signature(spec)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    function.__signature__ = signature.replace(
        parameters=[self_param, *signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc or spec.__doc__
    return method


def _sync(spec: Callable[P, Call[T]]) -> Callable[Concatenate[Client, P], T]:
    def method(self: Client, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._send(spec(*args, **kwargs))

    return _signed(method, spec, spec.__name__.lstrip("_"), None)


def _async(
    spec: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    async def method(self: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._send(spec(*args, **kwargs))

    return _signed(method, spec, spec.__name__.lstrip("_"), None)


def _sync_stream(
    spec: Callable[P, Call[Any]], events: Callable[[ServerSentEvent], T | None], doc: str
) -> Callable[Concatenate[Client, P], Iterator[T]]:
    def method(self: Client, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._stream(spec(*args, **kwargs).streaming(events))

    return _signed(method, spec, spec.__name__.lstrip("_") + "_stream", doc)


def _async_stream(
    spec: Callable[P, Call[Any]], events: Callable[[ServerSentEvent], T | None], doc: str
) -> Callable[Concatenate[AsyncClient, P], AsyncIterator[T]]:
    def method(self: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        return self._stream(spec(*args, **kwargs).streaming(events))

    return _signed(method, spec, spec.__name__.lstrip("_") + "_stream", doc)


_GENERATE_STREAM_DOC = """Each GeneratedToken as the server decodes it (greedy); raises on an
`error` event. Retried like generate() until the first token, never after."""
_QUERY_STREAM_DOC = """(event, payload) pairs as the graph runs: ("documents", RetrieveResponse),
("answers", ReadResponse), ("token", GeneratedToken)..., ("answer", QueryResponse)."""


# --- the two clients -------------------------------------------------------------------------


class Client:
    """Blocking client. Thread-safe (one httpx connection pool); use as a context manager."""

    operation = _sync(_operation)
    get_document = _sync(_get_document)
    delete_document = _sync(_delete_document)
    retrieve = _sync(_retrieve)
    read = _sync(_read)
    generate = _sync(_generate)
    generate_stream = _sync_stream(_generate, _token_event, _GENERATE_STREAM_DOC)
    query = _sync(_query)
    query_stream = _sync_stream(_query, _query_event, _QUERY_STREAM_DOC)
    models = _sync(_models)
    health = _sync(_health)
    ready = _sync(_ready)

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        retry: Retry | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`base_url` defaults to $QASERVE_URL, `api_key` to $QASERVE_API_KEY; `timeout` is
        httpx's (per connect/read/write; a stream's read timeout is per event)."""
        self.retry = retry or Retry()
        self._http = httpx.Client(
            base_url=base_url or os.environ.get("QASERVE_URL", DEFAULT_URL),
            headers=_headers(api_key, headers),
            timeout=timeout,
            transport=transport,
        )

    @overload
    def ingest(
        self,
        documents: Sequence[DocumentLike],
        collection: str | None = None,
        wait: Literal[True] = True,
    ) -> IngestResponse: ...
    @overload
    def ingest(
        self, documents: Sequence[DocumentLike], collection: str | None = None, *, wait: bool
    ) -> IngestResponse | Operation: ...
    def ingest(
        self, documents: Sequence[DocumentLike], collection: str | None = None, wait: bool = True
    ) -> IngestResponse | Operation:
        """Store documents; `wait=False` returns the `Operation` to poll (see `_ingest`)."""
        result: IngestResponse | Operation = self._send(_ingest(documents, collection, wait))
        return result

    def wait_operation(
        self, operation: Operation | str, timeout: float = 600.0, interval: float = 0.5
    ) -> Operation:
        """Poll a write until it lands (`done`); raises its error if it failed or was
        cancelled, QAServeTimeout if it is still running after `timeout` seconds."""
        op_id = operation if isinstance(operation, str) else operation.id
        deadline = time.monotonic() + timeout
        while True:
            op = self.operation(op_id)
            if _finished(op) is not None:
                return op
            if time.monotonic() > deadline:
                raise _wait_expired(op, timeout)
            time.sleep(interval)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, json=call.json, params=call.params
                )
            except httpx.TransportError as exc:
                delay = self.retry.after_exception(call, attempt, exc)
            else:
                if response.is_success or response.status_code in call.answers:
                    return call.parse(response)
                delay = self.retry.after_response(call, attempt, response)
            time.sleep(delay)
            attempt += 1

    def _stream(self, call: Call[Any]) -> Iterator[Any]:
        """Retried like any call until the first event arrives, never after."""
        attempt, started = 0, False
        while True:
            try:
                with self._http.stream(call.method, call.path, json=call.json) as response:
                    if not response.is_success:
                        response.read()
                        delay = self.retry.after_response(call, attempt, response)
                    else:
                        decoder = SSEDecoder()
                        for text in response.iter_text():
                            for item in _stream_items(call, decoder, text):
                                if item is _DONE:
                                    return
                                started = True
                                yield item
                        raise _unfinished(call)
            except httpx.TransportError as exc:
                if started:
                    raise QAServeConnectionError(f"{call.path}: stream broken: {exc!r}") from exc
                delay = self.retry.after_exception(call, attempt, exc)
            time.sleep(delay)
            attempt += 1


class AsyncClient:
    """The same methods as `Client`, awaitable; streams are async iterators."""

    operation = _async(_operation)
    get_document = _async(_get_document)
    delete_document = _async(_delete_document)
    retrieve = _async(_retrieve)
    read = _async(_read)
    generate = _async(_generate)
    generate_stream = _async_stream(_generate, _token_event, _GENERATE_STREAM_DOC)
    query = _async(_query)
    query_stream = _async_stream(_query, _query_event, _QUERY_STREAM_DOC)
    models = _async(_models)
    health = _async(_health)
    ready = _async(_ready)

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        retry: Retry | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or Retry()
        self._http = httpx.AsyncClient(
            base_url=base_url or os.environ.get("QASERVE_URL", DEFAULT_URL),
            headers=_headers(api_key, headers),
            timeout=timeout,
            transport=transport,
        )

    @overload
    async def ingest(
        self,
        documents: Sequence[DocumentLike],
        collection: str | None = None,
        wait: Literal[True] = True,
    ) -> IngestResponse: ...
    @overload
    async def ingest(
        self, documents: Sequence[DocumentLike], collection: str | None = None, *, wait: bool
    ) -> IngestResponse | Operation: ...
    async def ingest(
        self, documents: Sequence[DocumentLike], collection: str | None = None, wait: bool = True
    ) -> IngestResponse | Operation:
        """As `Client.ingest`."""
        result: IngestResponse | Operation = await self._send(_ingest(documents, collection, wait))
        return result

    async def wait_operation(
        self, operation: Operation | str, timeout: float = 600.0, interval: float = 0.5
    ) -> Operation:
        """As `Client.wait_operation`."""
        op_id = operation if isinstance(operation, str) else operation.id
        deadline = time.monotonic() + timeout
        while True:
            op = await self.operation(op_id)
            if _finished(op) is not None:
                return op
            if time.monotonic() > deadline:
                raise _wait_expired(op, timeout)
            await asyncio.sleep(interval)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.json, params=call.params
                )
            except httpx.TransportError as exc:
                delay = self.retry.after_exception(call, attempt, exc)
            else:
                if response.is_success or response.status_code in call.answers:
                    return call.parse(response)
                delay = self.retry.after_response(call, attempt, response)
            await asyncio.sleep(delay)
            attempt += 1

    async def _stream(self, call: Call[Any]) -> AsyncIterator[Any]:
        attempt, started = 0, False
        while True:
            try:
                async with self._http.stream(call.method, call.path, json=call.json) as response:
                    if not response.is_success:
                        await response.aread()
                        delay = self.retry.after_response(call, attempt, response)
                    else:
                        decoder = SSEDecoder()
                        async for text in response.aiter_text():
                            for item in _stream_items(call, decoder, text):
                                if item is _DONE:
                                    return
                                started = True
                                yield item
                        raise _unfinished(call)
            except httpx.TransportError as exc:
                if started:
                    raise QAServeConnectionError(f"{call.path}: stream broken: {exc!r}") from exc
                delay = self.retry.after_exception(call, attempt, exc)
            await asyncio.sleep(delay)
            attempt += 1
