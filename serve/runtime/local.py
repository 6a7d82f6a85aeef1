"""The in-process transport: `LocalStages` runs the registry's stage objects in a thread pool,
so the one pipeline serves without Ray; `Engine` is the same pipeline as plain blocking calls
for the CLI, `qaserve eval` and the benchmarks.

The stages' calls block (torch, ONNX Runtime, Qdrant Edge), so each runs in a small pool and
the event loop stays free; streams advance one item per pool task. Writes embed side by side,
one pool task per batch (cancellable between batches), and commit to the embedded store one at
a time (`qaserve.deployments.operations`). Stages load on first use, or all at startup with
`preload`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from qaserve.cancel import CancelToken, run_cancellable
from qaserve.config import EngineConfig
from qaserve.deployments.operations import Operations, WriteOp, WriteOwner
from qaserve.deployments.span_scores import ScoreRequest, ScoreResponse
from qaserve.pipeline import Pipeline
from qaserve.stages import STAGES, build_stages, model_infos, stage
from qaserve.threads import bound_threads, iterate_blocking
from qaserve_client.schema import (
    DocumentIn,
    DocumentOut,
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    IngestRequest,
    IngestResponse,
    ModelInfo,
    QueryRequest,
    QueryResponse,
    ReadRequest,
    ReadResponse,
    RetrievedDocument,
    RetrieveRequest,
)

if TYPE_CHECKING:
    from qaserve.deployments.generator import RagTokenGenerator
    from qaserve.deployments.reader import Reader
    from qaserve.deployments.retriever import Retriever

log = logging.getLogger("qaserve.local")
T = TypeVar("T")


class LocalStages(WriteOwner):
    """`StageCalls` over stage objects held in this process."""

    def __init__(self, cfg: EngineConfig, workers: int = 4, preload: bool = True) -> None:
        """`preload` loads every stage at app startup, so /readyz means "can answer"."""
        self.cfg = cfg.resolve_models()
        self.threads = bound_threads(self.cfg.threads or None)
        self.preload = preload
        self.load_errors: dict[str, str] = {}
        self._built: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qaserve")
        self._write_lock = threading.Lock()
        self._load_lock = threading.RLock()
        self.operations = Operations()

    # --- the stage objects --------------------------------------------------------------------

    def stage(self, name: str) -> Any:
        """The stage object, built (with what it needs) on first use."""
        built = self._built.get(name)
        if built is not None:
            return built
        with self._load_lock:
            return build_stages(self.cfg, [name], self.threads, self._built)[name]

    @property
    def retriever(self) -> Retriever:
        return self.stage("retriever")

    @property
    def reader(self) -> Reader:
        return self.stage("reader")

    @property
    def generator(self) -> RagTokenGenerator:
        return self.stage("generator")

    def loaded(self, name: str) -> bool:
        return name in self._built

    def load(self) -> None:
        """Build every stage once; a stage that fails stays not-ready and the others serve."""
        for s in STAGES:
            if s.name in self._built or s.name in self.load_errors:
                continue
            try:
                self.stage(s.name)
            except Exception as exc:
                self.load_errors[s.name] = str(exc)
                log.warning("stage %s failed to load: %s", s.name, exc)

    # --- StageCalls ----------------------------------------------------------------------------

    async def startup(self) -> None:
        if self.preload:
            await self._run(self.load)

    async def ready(self, name: str) -> bool:
        stage(name)  # an unknown name is an error, not "not ready"
        return self.loaded(name)

    async def info(self, name: str) -> list[ModelInfo]:
        return model_infos(await self._run(lambda: self.stage(name).info()))

    async def retrieve(self, request: RetrieveRequest) -> list[RetrievedDocument]:
        return await self._run(
            lambda: self.retriever.retrieve(
                request.query,
                top_k=request.top_k,
                filters=request.filters,
                collection=request.collection,
                mode=request.retrieval,
            )
        )

    # Reads and generations take a token (qaserve.cancel): when the awaiting task is
    # cancelled (a timeout, a client gone), the stage stops at its next step.

    async def read(self, request: ReadRequest) -> ReadResponse:
        return await run_cancellable(
            lambda cancel: self.reader.read_batch([request], cancel)[0], self._pool
        )

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        return await run_cancellable(
            lambda cancel: self.generator.generate_request(request, cancel),
            self._pool,
        )

    def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GeneratedToken]:
        cancel = CancelToken()
        return iterate_blocking(
            lambda: self.generator.stream_request(request, cancel),
            self._pool,
            cancel,
        )

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        return await run_cancellable(
            lambda cancel: self.generator.score_request(request, cancel), self._pool
        )

    async def get_document(self, doc_id: str, collection: str | None) -> DocumentOut:
        return await self._run(lambda: self.retriever.get(doc_id, collection))

    async def delete_document(self, doc_id: str, collection: str | None) -> None:
        await self._run(self._write, self.retriever.delete, doc_id, collection)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        retriever = self._built.get("retriever")
        if retriever is not None:
            retriever.close()

    # --- writes: embedding side by side, the commit one at a time -----------------------------

    async def _ingest(self, op: WriteOp, request: IngestRequest) -> IngestResponse:
        retriever = await self._run(lambda: self.retriever)
        docs, texts = await self._run(retriever.prepare, request.documents)
        op.total = len(texts)
        batch = max(1, self.cfg.embedder.batch_size)
        parts = [np.zeros((0, retriever.embedder.dim), np.float32)]
        for i in range(0, len(texts), batch):
            op.check()
            parts.append(await self._run(retriever.embedder.embed, texts[i : i + batch]))
            op.advance(len(parts[-1]))
        vectors = np.concatenate(parts)
        return await self._run(self._commit, op, docs, vectors, request.collection)

    def _commit(
        self, op: WriteOp, docs: Any, vectors: np.ndarray, collection: str | None
    ) -> IngestResponse:
        with self._write_lock:
            op.begin_commit()  # a write cancelled before this point writes nothing
            return self.retriever.write(docs, vectors, collection)

    # --- plumbing ------------------------------------------------------------------------------

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        with self._write_lock:
            return fn(*args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))


def local_pipeline(cfg: EngineConfig, workers: int = 4, preload: bool = True) -> Pipeline:
    """The pipeline in this process: what `build_app` serves without Ray."""
    stages = LocalStages(cfg, workers=workers, preload=preload)
    return Pipeline(stages, stages.cfg.ensemble)


class Engine:
    """The pipeline as blocking calls, stages loaded on first use (`ask --mode extractive`
    never pays for the generator): the CLI, `qaserve eval` and the benchmarks."""

    def __init__(self, cfg: EngineConfig | None = None, workers: int = 2) -> None:
        self.stages = LocalStages(cfg or EngineConfig.load(), workers=workers, preload=False)
        self.cfg = self.stages.cfg
        self.pipeline = Pipeline(self.stages, self.cfg.ensemble)
        self._loop = asyncio.new_event_loop()

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(call)

    @property
    def retriever(self) -> Retriever:
        return self.stages.retriever

    @property
    def reader(self) -> Reader:
        return self.stages.reader

    @property
    def generator(self) -> RagTokenGenerator:
        return self.stages.generator

    def ingest(
        self, documents: list[DocumentIn], collection: str | None = None, progress: bool = False
    ) -> IngestResponse:
        return self.retriever.ingest(documents, collection=collection, progress=progress)

    def get_document(self, doc_id: str, collection: str | None = None) -> DocumentOut:
        return self.retriever.get(doc_id, collection=collection)

    def delete_document(self, doc_id: str, collection: str | None = None) -> None:
        self.retriever.delete(doc_id, collection=collection)

    def query(self, request: QueryRequest) -> QueryResponse:
        return self.run(self.pipeline.query(request))

    def models(self) -> list[ModelInfo]:
        return self.run(self.pipeline.models()).models

    def close(self) -> None:
        self.stages.close()
        self._loop.close()
