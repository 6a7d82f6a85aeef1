"""The retriever's thin Ray Serve deployments: the store owner and the bulk encoder.

The Retriever embeds queries itself (batched across concurrent requests), so a query makes
one hop here, not two; the Embedder deployment scales out for what is heavy, embedding the
passages of an ingest, which the Retriever fans out across its replicas. Concurrent writes
embed side by side; only their commits take the store's write lock, one at a time. Writes are
operations (qaserve.deployments.operations): stopped before the commit, or completed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from qaserve.cancel import CancelToken, run_cancellable
from qaserve.deployments.operations import Operations, WriteOp, WriteOwner, outcome
from qaserve.deployments.replica import batch_histogram, build_replica_stage, configure_batch
from qaserve_client.schema import (
    DocumentOut,
    IngestRequest,
    IngestResponse,
    ModelInfo,
    RetrievedDocument,
    RetrieveRequest,
)

INGEST_CHUNK = 64  # passages per Embedder call: an ingest spreads over the Embedder replicas
log = logging.getLogger("ray.serve")


@serve.deployment(name="Embedder")
class EmbedderDeployment:
    def __init__(
        self, engine: dict[str, Any], replica: dict[str, Any], needs: dict[str, Any]
    ) -> None:
        self.embedder = build_replica_stage(engine, "embedder", replica)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Batch by batch: a cancelled request (its write was stopped) ends at the next one."""
        return await run_cancellable(lambda token: self._embed(texts, token))

    def _embed(self, texts: list[str], token: CancelToken) -> np.ndarray:
        size = max(1, self.embedder.cfg.batch_size)
        parts = [np.zeros((0, self.embedder.dim), np.float32)]
        for i in range(0, len(texts), size):
            token.check()
            parts.append(self.embedder.embed(texts[i : i + size]))
        return np.concatenate(parts)

    def info(self) -> ModelInfo:
        return self.embedder.info()

    def ready(self) -> bool:
        return True


@serve.deployment(name="Retriever")
class RetrieverDeployment(WriteOwner):
    def __init__(
        self, engine: dict[str, Any], replica: dict[str, Any], needs: dict[str, DeploymentHandle]
    ) -> None:
        self.retriever = build_replica_stage(engine, "retriever", replica)
        self.embedders = needs["embedder"]
        self.batch_sizes = batch_histogram("retriever")
        self.batched = configure_batch(self._embed_queries, replica)
        self._write = asyncio.Lock()
        self.operations = Operations()
        # Serve runs __init__ on the replica's event loop: the seeding runs beside requests.
        self._seeding = (
            asyncio.get_running_loop().create_task(self._seed_sample())
            if replica.get("sample_corpus")
            else None
        )

    async def _seed_sample(self) -> None:
        """The shipped sample corpus into an empty store (`sample_corpus`), retried until it
        lands; ready() stays False until then, so /readyz never reports an empty store ready."""
        from qaserve.loaders import sample_documents

        delay = 1.0
        while True:
            try:
                if await self.count() == 0:
                    docs = await asyncio.to_thread(sample_documents)
                    done = await self.ingest(IngestRequest(documents=docs))
                    log.info("ingested the sample corpus (%d reviews)", len(done.ids))
                return
            except Exception:
                log.exception("sample corpus ingest failed; retrying in %.0f s", delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 10.0)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _embed_queries(self, texts: list[str]) -> list[np.ndarray]:
        """Queries from concurrent requests embedded as one batch."""
        self.batch_sizes.observe(len(texts))
        return list(await asyncio.to_thread(self.retriever.embedder.embed, texts))

    async def retrieve(self, request: RetrieveRequest) -> list[RetrievedDocument]:
        vector = None  # unbatched: Retriever.retrieve embeds the query in the same thread
        if self.batched and (request.retrieval or self.retriever.default_mode) != "sparse":
            vector = await self._embed_queries(request.query)
        return await asyncio.to_thread(
            self.retriever.retrieve,
            request.query,
            request.top_k,
            request.filters,
            request.collection,
            request.retrieval,
            vector,
        )

    async def ingest(self, request: IngestRequest) -> IngestResponse:
        """The whole write, waited for (the first-start sample ingest)."""
        op = self.operations.start(lambda op: self._ingest(op, request))
        done = outcome(await self.operations.wait(op.id))
        assert done.result is not None
        return done.result

    async def _ingest(self, op: WriteOp, request: IngestRequest) -> IngestResponse:
        docs, texts = await asyncio.to_thread(self.retriever.prepare, request.documents)
        op.total = len(texts)

        async def embed(chunk: list[str]) -> np.ndarray:
            op.check()
            vectors: np.ndarray = await self.embedders.embed.remote(chunk)
            op.advance(len(chunk))
            return vectors

        chunks = [texts[i : i + INGEST_CHUNK] for i in range(0, len(texts), INGEST_CHUNK)]
        parts = await asyncio.gather(*(embed(c) for c in chunks))
        dim = self.retriever.embedder.dim
        vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        async with self._write:  # one writer at a time: replace-by-id must not interleave
            op.begin_commit()  # a write cancelled before this point writes nothing
            return await asyncio.to_thread(self.retriever.write, docs, vectors, request.collection)

    async def get(self, doc_id: str, collection: str | None) -> DocumentOut:
        return await asyncio.to_thread(self.retriever.get, doc_id, collection)

    async def delete(self, doc_id: str, collection: str | None) -> None:
        async with self._write:
            await asyncio.to_thread(self.retriever.delete, doc_id, collection)

    async def count(self, collection: str | None = None) -> int:
        return await asyncio.to_thread(self.retriever.count, collection)

    def info(self) -> ModelInfo:
        return self.retriever.info()

    async def ready(self) -> bool:
        return self._seeding is None or self._seeding.done()

    def __del__(self) -> None:
        retriever = getattr(self, "retriever", None)
        if retriever is not None:
            retriever.close()
