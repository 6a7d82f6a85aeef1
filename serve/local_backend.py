"""`Backend` over an in-process `Engine`: serving without Ray, and the API's tests.

The engine's calls block (torch, ONNX Runtime, Qdrant Edge), so each runs in a small thread
pool and the event loop stays free for other requests; streams advance one item per pool
task. Writes to the embedded store go one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from qaserve.engine import Engine, QueryEvent
from qaserve_client.schema import (
    DocumentOut,
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    IngestRequest,
    IngestResponse,
    ModelsResponse,
    QueryRequest,
    QueryResponse,
    ReadRequest,
    ReadResponse,
    RetrieveRequest,
    RetrieveResponse,
)

log = logging.getLogger("qaserve.local")
T = TypeVar("T")
_DONE = object()
STAGES = ("retriever", "reader", "generator", "ensemble")


class LocalBackend:
    def __init__(self, engine: Engine, workers: int = 4, preload: bool = True) -> None:
        """`preload` loads every stage at app startup, so /readyz means "can answer"."""
        self.engine = engine
        self.preload = preload
        self.load_errors: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qaserve")
        self._write_lock = threading.Lock()
        self._load_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        if self.preload:
            await self._run(self.load)

    def load(self) -> None:
        """Build every stage once; a stage that fails stays not-ready and the others serve."""
        with self._load_lock:
            for stage in STAGES:
                if stage in self.engine.__dict__ or stage in self.load_errors:
                    continue
                try:
                    getattr(self.engine, stage)
                except Exception as exc:
                    self.load_errors[stage] = str(exc)
                    log.warning("stage %s failed to load: %s", stage, exc)

    async def ready(self) -> dict[str, bool]:
        return {stage: stage in self.engine.__dict__ for stage in STAGES}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.close()

    # --- documents -----------------------------------------------------------------------------

    async def ingest(self, request: IngestRequest) -> IngestResponse:
        return await self._run(
            self._write, self.engine.ingest, request.documents, request.collection
        )

    async def get_document(self, doc_id: str, collection: str | None = None) -> DocumentOut:
        return await self._run(self.engine.get_document, doc_id, collection)

    async def delete_document(self, doc_id: str, collection: str | None = None) -> None:
        await self._run(self._write, self.engine.delete_document, doc_id, collection)

    # --- stages --------------------------------------------------------------------------------

    async def retrieve(self, request: RetrieveRequest) -> RetrieveResponse:
        def run() -> RetrieveResponse:
            documents = self.engine.retriever.retrieve(
                request.query,
                top_k=request.top_k,
                filters=request.filters,
                collection=request.collection,
                mode=request.retrieval,
            )
            return RetrieveResponse(documents=documents)

        return await self._run(run)

    async def read(self, request: ReadRequest) -> ReadResponse:
        return await self._run(
            lambda: self.engine.reader.read(
                request.question,
                request.documents,
                top_k=request.top_k,
                max_answer_len=request.max_answer_len,
                handle_impossible_answer=request.handle_impossible_answer,
            )
        )

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        return await self._run(
            lambda: self.engine.generator.generate(
                request.question,
                request.documents,
                max_new_tokens=request.max_new_tokens,
                num_beams=request.num_beams,
            )
        )

    def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GeneratedToken]:
        return self._iterate(
            lambda: self.engine.generator.stream(
                request.question, request.documents, request.max_new_tokens
            )
        )

    async def query(self, request: QueryRequest) -> QueryResponse:
        return await self._run(self.engine.query, request)

    def query_events(self, request: QueryRequest) -> AsyncIterator[QueryEvent]:
        return self._iterate(lambda: self.engine.query_events(request))

    async def models(self) -> ModelsResponse:
        return ModelsResponse(models=await self._run(self.engine.models))

    # --- plumbing ------------------------------------------------------------------------------

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        with self._write_lock:
            return fn(*args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    async def _iterate(self, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """A blocking iterator, one `next` per pool task. When the consumer stops early (a
        client disconnects), the iterator is closed in the pool once its running step ends,
        so a generation stops instead of running on for nobody."""
        state: dict[str, Iterator[T]] = {}

        def step() -> Any:
            if "it" not in state:
                state["it"] = make()
            return next(state["it"], _DONE)

        def close(pending: Future[Any] | None) -> None:
            if pending is not None:
                wait([pending])
            close_it = getattr(state.get("it"), "close", None)
            if close_it is not None:
                close_it()

        pending: Future[Any] | None = None
        try:
            while True:
                pending = self._pool.submit(step)
                item = await asyncio.wrap_future(pending)
                if item is _DONE:
                    return
                yield item
        finally:
            with contextlib.suppress(RuntimeError):  # a pool shut down has nothing left to stop
                self._pool.submit(close, pending)
