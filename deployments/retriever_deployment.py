"""The retriever's thin Ray Serve deployments: the store owner and the bulk encoder.

The Retriever embeds queries itself (batched across concurrent requests), so a query makes
one hop here, not two; the Embedder deployment scales out for what is heavy, embedding the
passages of an ingest, which the Retriever fans out across its replicas.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

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


@serve.deployment(name="Embedder")
class EmbedderDeployment:
    def __init__(
        self, engine: dict[str, Any], replica: dict[str, Any], needs: dict[str, Any]
    ) -> None:
        self.embedder = build_replica_stage(engine, "embedder", replica)

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self.embedder.embed, texts)

    def info(self) -> ModelInfo:
        return self.embedder.info()

    def ready(self) -> bool:
        return True


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    def __init__(
        self, engine: dict[str, Any], replica: dict[str, Any], needs: dict[str, DeploymentHandle]
    ) -> None:
        self.retriever = build_replica_stage(engine, "retriever", replica)
        self.embedders = needs["embedder"]
        self.batch_sizes = batch_histogram("retriever")
        self.batched = configure_batch(self._embed_queries, replica)
        self._write = asyncio.Lock()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _embed_queries(self, texts: list[str]) -> list[np.ndarray]:
        """Queries from concurrent requests embedded as one batch."""
        self.batch_sizes.observe(len(texts))
        return list(await asyncio.to_thread(self.retriever.embedder.embed, texts))

    async def retrieve(self, request: RetrieveRequest) -> list[RetrievedDocument]:
        vector = None  # unbatched: Retriever.retrieve embeds the query in the same thread
        if self.batched and request.retrieval != "sparse":
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
        docs, texts = self.retriever.prepare(request.documents)
        chunks = [texts[i : i + INGEST_CHUNK] for i in range(0, len(texts), INGEST_CHUNK)]
        parts = await asyncio.gather(*(self.embedders.embed.remote(c) for c in chunks))
        dim = self.retriever.embedder.dim
        vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        async with self._write:  # one writer at a time: replace-by-id must not interleave
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

    def ready(self) -> bool:
        return True

    def __del__(self) -> None:
        retriever = getattr(self, "retriever", None)
        if retriever is not None:
            retriever.close()
