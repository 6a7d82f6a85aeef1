"""The in-process engine: the four stages wired together without Ray.

This is the pipeline the CLI runs today and the reference the Ray Serve graph must match:
retrieve once, read and generate over the same documents, then ensemble. Stages load lazily
so `ask --mode extractive` never pays for the generator.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING

from qaserve.config import EngineConfig
from qaserve.threads import bound_threads
from qaserve_client.schema import (
    DocumentIn,
    DocumentOut,
    FinalAnswer,
    GeneratedToken,
    GenerateResponse,
    IngestResponse,
    ModelInfo,
    QueryRequest,
    QueryResponse,
    ReadDocument,
    ReadResponse,
    RetrievedDocument,
    RetrieveResponse,
)

if TYPE_CHECKING:
    from qaserve.deployments.ensemble import Ensemble
    from qaserve.deployments.generator import RagTokenGenerator
    from qaserve.deployments.reader import Reader
    from qaserve.deployments.retriever import Retriever


QueryEvent = tuple[str, RetrieveResponse | ReadResponse | GeneratedToken | QueryResponse]


def as_read_documents(documents: list[RetrievedDocument]) -> list[ReadDocument]:
    return [ReadDocument(id=d.id, text=d.text, score=d.score) for d in documents]


def query_response(
    documents: list[RetrievedDocument],
    answer: FinalAnswer,
    read: ReadResponse | None,
    generated: GenerateResponse | None,
    timings: dict[str, float],
    start: float,
) -> QueryResponse:
    """The /v1/query answer, shared by the in-process engine and the Ray ingress."""
    timings["total"] = round((time.perf_counter() - start) * 1000, 3)
    spans = [a for a in read.answers if a.answer] if read else []
    return QueryResponse(
        answer=answer, answers=spans, generated=generated, documents=documents, timings_ms=timings
    )


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round((time.perf_counter() - start) * 1000, 3)


class Engine:
    def __init__(self, cfg: EngineConfig | None = None) -> None:
        self.cfg = (cfg or EngineConfig.load()).resolve_models()
        self.threads = bound_threads(self.cfg.threads or None)

    # Stages, built on first use.
    @cached_property
    def retriever(self) -> Retriever:
        from qaserve.deployments.retriever import Retriever

        return Retriever(self.cfg)

    @cached_property
    def reader(self) -> Reader:
        from qaserve.deployments.reader import Reader

        return Reader(self.cfg.reader, self.cfg.cache_dir, threads=self.threads)

    @cached_property
    def generator(self) -> RagTokenGenerator:
        from qaserve.deployments.generator import RagTokenGenerator

        return RagTokenGenerator(self.cfg.generator, threads=self.threads)

    @cached_property
    def ensemble(self) -> Ensemble:
        from qaserve.deployments.ensemble import Ensemble

        return Ensemble(self.cfg.ensemble)

    # Documents.
    def ingest(
        self, documents: list[DocumentIn], collection: str | None = None, progress: bool = False
    ) -> IngestResponse:
        return self.retriever.ingest(documents, collection=collection, progress=progress)

    def get_document(self, doc_id: str, collection: str | None = None) -> DocumentOut:
        return self.retriever.get(doc_id, collection=collection)

    def delete_document(self, doc_id: str, collection: str | None = None) -> None:
        self.retriever.delete(doc_id, collection=collection)

    # The graph.
    def query(self, request: QueryRequest) -> QueryResponse:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        documents = self._retrieve(request, timings)
        read: ReadResponse | None = None
        generated: GenerateResponse | None = None
        if documents:
            docs = as_read_documents(documents)
            if request.mode in ("extractive", "ensemble"):
                read = self._read(request, docs, timings)
            if request.mode in ("generative", "ensemble"):
                with _timed(timings, "generator"):
                    generated = self.generator.generate(
                        request.question, docs, max_new_tokens=request.max_new_tokens
                    )
        return self._respond(request, documents, read, generated, timings, start)

    def query_events(self, request: QueryRequest) -> Iterator[QueryEvent]:
        """query() as events for streaming: ("documents", RetrieveResponse), then
        ("answers", ReadResponse) when the mode reads, one ("token", GeneratedToken) per
        generated token when it generates (greedy, whatever num_beams), ("answer", QueryResponse).

        timings_ms leave out the time the consumer holds each event, so they match query()'s.
        """
        timings: dict[str, float] = {}
        start = time.perf_counter()
        paused = 0.0  # seconds spent suspended at a yield
        documents = self._retrieve(request, timings)
        mark = time.perf_counter()
        yield "documents", RetrieveResponse(documents=documents)
        paused += time.perf_counter() - mark
        docs = as_read_documents(documents)
        read: ReadResponse | None = None
        if request.mode in ("extractive", "ensemble"):
            read = self._read(request, docs, timings) if docs else ReadResponse(answers=[])
            mark = time.perf_counter()
            yield "answers", read
            paused += time.perf_counter() - mark
        generated: GenerateResponse | None = None
        if docs and request.mode in ("generative", "ensemble"):
            tokens: list[GeneratedToken] = []
            gen_start, gen_paused = time.perf_counter(), paused
            for token in self.generator.stream(request.question, docs, request.max_new_tokens):
                tokens.append(token)
                mark = time.perf_counter()
                yield "token", token
                paused += time.perf_counter() - mark
            busy = time.perf_counter() - gen_start - (paused - gen_paused)
            timings["generator"] = round(busy * 1000, 3)
            generated = GenerateResponse(
                text="".join(t.text for t in tokens),
                tokens=tokens,
                document_weights=self.generator.log_prior(docs).exp().tolist(),
            )
        yield "answer", self._respond(request, documents, read, generated, timings, start + paused)

    def _retrieve(
        self, request: QueryRequest, timings: dict[str, float]
    ) -> list[RetrievedDocument]:
        with _timed(timings, "retriever"):
            return self.retriever.retrieve(
                request.question,
                top_k=request.top_k_retriever,
                filters=request.filters,
                collection=request.collection,
                mode=request.retrieval,
            )

    def _read(
        self, request: QueryRequest, docs: list[ReadDocument], timings: dict[str, float]
    ) -> ReadResponse:
        with _timed(timings, "reader"):
            return self.reader.read(
                request.question, docs, top_k=request.top_k_reader, handle_impossible_answer=True
            )

    def _respond(
        self,
        request: QueryRequest,
        documents: list[RetrievedDocument],
        read: ReadResponse | None,
        generated: GenerateResponse | None,
        timings: dict[str, float],
        start: float,
    ) -> QueryResponse:
        with _timed(timings, "ensemble"):
            if not documents:
                answer = FinalAnswer(text="", source="none", score=0.0)
            else:
                answer = self.ensemble.combine(request.mode, read, generated)
        return query_response(documents, answer, read, generated, timings, start)

    def models(self) -> list[ModelInfo]:
        infos = list(self.retriever.info())
        infos.append(self.reader.info())
        infos.append(self.generator.info())
        return infos

    def close(self) -> None:
        if "retriever" in self.__dict__:
            self.retriever.close()
