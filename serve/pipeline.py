"""The query pipeline, written once: retrieve, then read and generate at the same time over the
same documents, then the ensemble policy; as one answer (`query`) or as events (`query_events`).
With `ensemble.generator_use: score`, ensemble mode scores the reader's spans with the
generator after the read instead of generating (`score_request`).

It runs against `StageCalls`, the few calls a transport provides: `LocalStages` (stage objects
in a thread pool, qaserve.runtime.local) and `RayStages` (deployment handles,
qaserve.runtime.ingress). The HTTP app, the CLI and `qaserve eval` all run this class, so the
transports cannot drift: the requests a query derives for each stage are built here, the
server's configured values fill what the caller left unset (inside the stages), and timings
are measured the same way for both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from qaserve.config import EnsembleConfig
from qaserve.deployments.ensemble import Ensemble
from qaserve.deployments.prior import generate_response
from qaserve.deployments.span_scores import MAX_CANDIDATES, ScoreRequest, ScoreResponse
from qaserve.errors import StageTimeout
from qaserve.stages import STAGES
from qaserve_client.schema import (
    DocumentOut,
    FinalAnswer,
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    IngestRequest,
    IngestResponse,
    ModelInfo,
    ModelsResponse,
    Operation,
    QueryRequest,
    QueryResponse,
    ReadDocument,
    ReadRequest,
    ReadResponse,
    RetrievedDocument,
    RetrieveRequest,
    RetrieveResponse,
)

T = TypeVar("T")
Event = tuple[str, BaseModel]
READY_TIMEOUT_S = 5.0


class StageCalls(Protocol):
    """What a transport provides: one call per stage operation. Errors are exceptions that
    `qaserve.errors.as_api_error` maps (the same for every transport)."""

    async def retrieve(self, request: RetrieveRequest) -> list[RetrievedDocument]: ...
    async def read(self, request: ReadRequest) -> ReadResponse: ...
    async def generate(self, request: GenerateRequest) -> GenerateResponse: ...
    def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GeneratedToken]: ...
    async def score(self, request: ScoreRequest) -> ScoreResponse: ...
    async def start_ingest(self, request: IngestRequest) -> Operation: ...
    async def operation(self, op_id: str) -> Operation: ...
    async def wait_operation(self, op_id: str, timeout: float | None) -> Operation: ...
    async def cancel_operation(self, op_id: str, why: str) -> Operation: ...
    async def get_document(self, doc_id: str, collection: str | None) -> DocumentOut: ...
    async def delete_document(self, doc_id: str, collection: str | None) -> None: ...
    async def info(self, stage: str) -> list[ModelInfo]: ...
    async def ready(self, stage: str) -> bool: ...
    async def startup(self) -> None: ...
    def close(self) -> None: ...


# --- the requests a query derives, built in one place ------------------------------------------


def reads(request: QueryRequest) -> bool:
    return request.mode in ("extractive", "ensemble")


def generates(request: QueryRequest) -> bool:
    return request.mode in ("generative", "ensemble")


def retrieve_request(request: QueryRequest) -> RetrieveRequest:
    return RetrieveRequest(
        query=request.question,
        top_k=request.top_k_retriever,
        filters=request.filters,
        collection=request.collection,
        retrieval=request.retrieval,
    )


def as_read_documents(documents: list[RetrievedDocument]) -> list[ReadDocument]:
    return [ReadDocument(id=d.id, text=d.text, score=d.score) for d in documents]


def read_request(request: QueryRequest, docs: list[ReadDocument]) -> ReadRequest:
    return ReadRequest(
        question=request.question,
        documents=docs,
        top_k=request.top_k_reader,
        max_answer_len=request.max_answer_len,
        handle_impossible_answer=True,
    )


def generate_request(request: QueryRequest, docs: list[ReadDocument]) -> GenerateRequest:
    return GenerateRequest(
        question=request.question,
        documents=docs,
        max_new_tokens=request.max_new_tokens,
        num_beams=request.num_beams,
    )


def score_request(
    request: QueryRequest, docs: list[ReadDocument], read: ReadResponse, documents: int
) -> ScoreRequest | None:
    """The reader's spans and "no answer" ("") over at most `documents` documents: those that
    hold the spans first, then the best retrieved; None when there is no span to weigh."""
    spans = [a for a in read.answers if a.answer][: MAX_CANDIDATES - 1]
    if not spans:
        return None
    holding = {a.document_id for a in spans}
    ranked = sorted(range(len(docs)), key=lambda i: (docs[i].id not in holding, i))
    chosen = sorted(ranked[:documents])  # back in retrieval order
    return ScoreRequest(
        question=request.question,
        documents=[docs[i] for i in chosen],
        candidates=[*[a.answer for a in spans], ""],
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _timed(timings: dict[str, float], stage: str, call: Awaitable[T]) -> T:
    t0 = time.perf_counter()
    try:
        return await call
    finally:
        timings[stage] = _ms(time.perf_counter() - t0)


async def _all(*calls: Coroutine[Any, Any, Any]) -> list[Any]:
    """Run concurrently; the first failure cancels the others (no work left running)."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


_END = object()


async def _next(stream: AsyncIterator[T]) -> Any:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _END


@dataclass
class Evidence:
    """What the stages said about one query, before the ensemble decides."""

    documents: list[RetrievedDocument]
    read: ReadResponse | None = None
    generated: GenerateResponse | None = None
    scored: ScoreResponse | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """What the HTTP app serves, over any transport's `StageCalls`."""

    def __init__(self, calls: StageCalls, ensemble: EnsembleConfig | None = None) -> None:
        self.calls = calls
        self.ensemble = Ensemble(ensemble)

    async def startup(self) -> None:
        await self.calls.startup()

    def close(self) -> None:
        self.calls.close()

    # --- documents and single stages ------------------------------------------------------

    async def ingest(self, request: IngestRequest, timeout: float | None = None) -> IngestResponse:
        """The write, all or nothing: at `timeout`, or when the caller goes away, it is
        stopped before its commit and nothing is written (a timeout raises StageTimeout); a
        write whose commit had begun completes, and its answer is returned."""
        op = await self.calls.start_ingest(request)
        try:
            done = await self.calls.wait_operation(op.id, timeout)
            if not done.finished:
                why = f"ingest did not finish within {timeout:g} s; nothing was written"
                done = await self.calls.cancel_operation(op.id, why)
        except asyncio.CancelledError:
            _detach(self.calls.cancel_operation(op.id, "the caller went away; nothing was written"))
            raise
        if done.result is None:  # cancelled: a failed write raised its own error above
            raise StageTimeout(done.error.message if done.error else "the write was stopped")
        return done.result

    async def start_ingest(self, request: IngestRequest) -> Operation:
        """The write started, not waited for: poll `operation(id)`."""
        return await self.calls.start_ingest(request)

    async def operation(self, op_id: str) -> Operation:
        return await self.calls.operation(op_id)

    async def get_document(self, doc_id: str, collection: str | None = None) -> DocumentOut:
        return await self.calls.get_document(doc_id, collection)

    async def delete_document(self, doc_id: str, collection: str | None = None) -> None:
        await self.calls.delete_document(doc_id, collection)

    async def retrieve(self, request: RetrieveRequest) -> RetrieveResponse:
        return RetrieveResponse(documents=await self.calls.retrieve(request))

    async def read(self, request: ReadRequest) -> ReadResponse:
        return await self.calls.read(request)

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        return await self.calls.generate(request)

    async def generate_events(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """("token", GeneratedToken)... then ("generated", GenerateResponse)."""
        tokens: list[GeneratedToken] = []
        stream = self.calls.generate_stream(request)
        try:
            async for token in stream:
                tokens.append(token)
                yield "token", token
        finally:
            await _aclose(stream)
        yield "generated", generate_response(tokens, request.documents)

    # --- the query ------------------------------------------------------------------------

    def scores(self, request: QueryRequest) -> bool:
        """Ensemble mode weighs the reader's spans by the generator's scores, not its text."""
        return request.mode == "ensemble" and self.ensemble.cfg.generator_use == "score"

    def _generates(self, request: QueryRequest) -> bool:
        return generates(request) and not self.scores(request)

    async def query(self, request: QueryRequest) -> QueryResponse:
        start = time.perf_counter()
        ev = await self.evidence(request)
        return self._respond(
            request, ev.documents, ev.read, ev.generated, ev.timings, start, ev.scored
        )

    async def evidence(self, request: QueryRequest) -> Evidence:
        """`query` up to the ensemble: also what `qaserve fit-ensemble` fits its policy on."""
        timings: dict[str, float] = {}
        documents = await _timed(
            timings, "retriever", self.calls.retrieve(retrieve_request(request))
        )
        ev = Evidence(documents, timings=timings)
        if documents:
            docs = as_read_documents(documents)
            jobs: list[Coroutine[Any, Any, ReadResponse | GenerateResponse]] = []
            if reads(request):
                jobs.append(_timed(timings, "reader", self.calls.read(read_request(request, docs))))
            if self._generates(request):
                gen = self.calls.generate(generate_request(request, docs))
                jobs.append(_timed(timings, "generator", gen))
            for result in await _all(*jobs):
                if isinstance(result, ReadResponse):
                    ev.read = result
                else:
                    ev.generated = result
            if ev.read is not None and self.scores(request):
                ev.scored = await self._score(request, docs, ev.read, timings)
        return ev

    async def _score(
        self,
        request: QueryRequest,
        docs: list[ReadDocument],
        read: ReadResponse,
        timings: dict[str, float],
    ) -> ScoreResponse | None:
        call = score_request(request, docs, read, self.ensemble.cfg.score_documents)
        if call is None:
            return None
        return await _timed(timings, "generator", self.calls.score(call))

    async def query_events(self, request: QueryRequest) -> AsyncIterator[Event]:
        """("documents", RetrieveResponse); ("answers", ReadResponse) when the mode reads;
        ("token", GeneratedToken) per token when it generates; ("answer", QueryResponse).

        The reader and the generator's first token run at the same time, as in `query`;
        timings leave out the time the consumer holds each event, so they match `query`'s.
        """
        timings: dict[str, float] = {}
        start = time.perf_counter()
        paused = 0.0  # seconds suspended at a yield: the consumer's time, not ours
        documents = await _timed(
            timings, "retriever", self.calls.retrieve(retrieve_request(request))
        )
        mark = time.perf_counter()
        yield "documents", RetrieveResponse(documents=documents)
        paused += time.perf_counter() - mark
        docs = as_read_documents(documents)
        read_task: asyncio.Future[ReadResponse] | None = None
        first: asyncio.Future[Any] | None = None
        stream: AsyncIterator[GeneratedToken] | None = None
        try:
            if docs and reads(request):
                read_call = _timed(timings, "reader", self.calls.read(read_request(request, docs)))
                read_task = asyncio.ensure_future(read_call)
            gen_start, gen_paused = time.perf_counter(), paused
            if docs and self._generates(request):
                stream = self.calls.generate_stream(generate_request(request, docs))
                first = asyncio.ensure_future(_next(stream))
            read: ReadResponse | None = None
            if reads(request):
                read = await read_task if read_task is not None else ReadResponse(answers=[])
                mark = time.perf_counter()
                yield "answers", read
                paused += time.perf_counter() - mark
            scored: ScoreResponse | None = None
            if read is not None and docs and self.scores(request):
                scored = await self._score(request, docs, read, timings)
            generated: GenerateResponse | None = None
            if stream is not None and first is not None:
                tokens: list[GeneratedToken] = []
                item = await first
                while item is not _END:
                    tokens.append(item)
                    mark = time.perf_counter()
                    yield "token", item
                    paused += time.perf_counter() - mark
                    item = await _next(stream)
                busy = time.perf_counter() - gen_start - (paused - gen_paused)
                timings["generator"] = _ms(busy)
                generated = generate_response(tokens, docs)
            yield (
                "answer",
                self._respond(request, documents, read, generated, timings, start + paused, scored),
            )
        finally:
            pending = [t for t in (read_task, first) if t is not None and not t.done()]
            for task in pending:
                task.cancel()
            # The stream can be closed only once no step of it is running.
            await asyncio.gather(*pending, return_exceptions=True)
            if stream is not None:
                await _aclose(stream)

    # --- ops ------------------------------------------------------------------------------

    async def models(self) -> ModelsResponse:
        infos = await asyncio.gather(*(self.calls.info(s.name) for s in STAGES))
        return ModelsResponse(models=[m for stage in infos for m in stage])

    async def ready(self) -> dict[str, bool]:
        """Every registered stage by name, the same keys whatever the transport."""

        async def one(name: str) -> bool:
            try:
                return bool(await asyncio.wait_for(self.calls.ready(name), READY_TIMEOUT_S))
            except Exception:
                return False

        states = await asyncio.gather(*(one(s.name) for s in STAGES))
        return {s.name: state for s, state in zip(STAGES, states, strict=True)}

    # --- helpers --------------------------------------------------------------------------

    def _respond(
        self,
        request: QueryRequest,
        documents: list[RetrievedDocument],
        read: ReadResponse | None,
        generated: GenerateResponse | None,
        timings: dict[str, float],
        start: float,
        scored: ScoreResponse | None = None,
    ) -> QueryResponse:
        t0 = time.perf_counter()
        if not documents:
            answer = FinalAnswer(text="", source="none", score=0.0)
        else:
            answer = self.ensemble.combine(request.mode, read, generated, scored, documents)
        timings["ensemble"] = _ms(time.perf_counter() - t0)
        timings["total"] = _ms(time.perf_counter() - start)
        return QueryResponse(
            answer=answer,
            answers=[a for a in read.answers if a.answer] if read else [],
            no_answer_score=read.no_answer_score if read else None,
            generated=generated,
            documents=documents,
            timings_ms=timings,
        )


_DETACHED: set[asyncio.Future[Any]] = set()


def _detach(call: Coroutine[Any, Any, Any]) -> None:
    """Run `call` to its end even though the task that started it is being cancelled."""
    task = asyncio.ensure_future(call)
    _DETACHED.add(task)
    task.add_done_callback(_DETACHED.discard)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with suppress(Exception):
            await close()
