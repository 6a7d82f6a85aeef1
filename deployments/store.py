"""Document stores: Qdrant Edge in-process (default) or qdrant-client (server URL / local mode).

Both keep one point per passage with the same payload layout, so they answer identically:

    doc_id, passage, offset, text, meta{...}      on every passage
    parent_text, n_passages                       on passage 0 only (what `get` returns)

Point ids are uuid5(doc id, passage number), so re-ingesting a document overwrites its
passages in place; passages beyond its new length are deleted afterwards. Everything that can
fail (vector shapes, BM25 vectors, payloads) is built before the first write, so a bad batch
never leaves the collection half-replaced.

BM25 uses Qdrant Edge's built-in embedder on both backends: the same token ids and weights as
Qdrant server's own BM25, and no fastembed (which downloads models) for qdrant-client.
"""

from __future__ import annotations

import math
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from qaserve.config import EngineConfig, StoreConfig
from qaserve.errors import BadRequest, ConfigError, DocumentNotFound
from qaserve_client.schema import DocumentOut, Filters, ModelInfo, RetrievalMode, RetrievedDocument

from .passages import Passage, SplitDocument

DENSE = "dense"
SPARSE = "bm25"
RRF_K = 60
WRITE_BATCH = 256
_POINT_NS = uuid.UUID("6f1c6d3e-5b7a-4c1e-9a55-0a6a2f7f6b10")
_COLLECTION_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_SIMPLE_KEY_RE = re.compile(r"^[A-Za-z0-9_]+$")
_HIDDEN = ["parent_text"]  # never sent back with search hits


def point_id(doc_id: str, passage: int) -> str:
    return str(uuid.uuid5(_POINT_NS, f"{doc_id}\x1f{passage}"))


def check_collection(name: str) -> str:
    # Edge maps collections to directories: a name must never escape data_dir.
    if not _COLLECTION_RE.match(name):
        raise BadRequest(
            f"collection {name!r}: use 1-64 letters, digits, '_' or '-'", field="collection"
        )
    return name


def meta_path(key: str) -> str:
    """The payload path of a metadata key; keys with dots or spaces are quoted."""
    if _SIMPLE_KEY_RE.match(key):
        return f"meta.{key}"
    if '"' in key or "\\" in key:
        raise BadRequest(f"filter key {key!r}: quotes are not allowed", field="filters")
    return f'meta."{key}"'


@dataclass(frozen=True)
class _Cond:
    """One backend-neutral condition: `path` equals one of `values` (scalars)."""

    path: str
    values: tuple[str | int | float | bool, ...]


def _conditions(filters: Filters | None) -> list[_Cond]:
    conds = []
    for key, value in (filters or {}).items():
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values:
            raise BadRequest(f"filter {key!r}: the list of accepted values is empty", "filters")
        for v in values:
            if not isinstance(v, str | int | float | bool):
                raise BadRequest(f"filter {key!r}: values must be scalars", field="filters")
            if isinstance(v, float) and not math.isfinite(v):
                raise BadRequest(f"filter {key!r}: values must be finite", field="filters")
        conds.append(_Cond(meta_path(key), values))
    return conds


def _check_vectors(docs: Sequence[SplitDocument], vectors: Sequence[np.ndarray], dim: int) -> None:
    if len(docs) != len(vectors):
        raise ValueError(f"{len(docs)} documents but {len(vectors)} vector blocks")
    for doc, vec in zip(docs, vectors, strict=True):
        if vec.shape != (len(doc.passages), dim):
            raise ValueError(
                f"document {doc.id!r}: vectors {vec.shape}, expected ({len(doc.passages)}, {dim})"
            )
        if not np.isfinite(vec).all():
            raise ValueError(f"document {doc.id!r}: non-finite embedding")


def _last_wins(
    docs: Sequence[SplitDocument], vectors: Sequence[np.ndarray]
) -> tuple[list[SplitDocument], list[np.ndarray]]:
    # The same id twice in one batch: the later one replaces the earlier, as two calls would.
    latest = {doc.id: i for i, doc in enumerate(docs)}
    keep = sorted(latest.values())
    return [docs[i] for i in keep], [vectors[i] for i in keep]


def _payload(doc: SplitDocument, p: Passage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "doc_id": doc.id,
        "passage": p.number,
        "offset": p.offset,
        "text": p.text,
        "meta": dict(p.meta),
    }
    if p.number == 0:
        body["parent_text"] = doc.text
        body["n_passages"] = len(doc.passages)
    return body


def _hit(payload: dict[str, Any], score: float) -> RetrievedDocument:
    return RetrievedDocument(
        id=payload["doc_id"],
        text=payload["text"],
        score=float(score),
        meta=payload.get("meta") or {},
        passage=int(payload.get("passage", 0)),
    )


def _doc_out(doc_id: str, payload: dict[str, Any] | None) -> DocumentOut:
    if not payload or "parent_text" not in payload:
        raise DocumentNotFound(f"no document with id {doc_id!r}", field="id")
    return DocumentOut(id=doc_id, text=payload["parent_text"], meta=payload.get("meta") or {})


def _batches(items: list[Any], size: int = WRITE_BATCH) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Bm25Encoder:
    """Qdrant's BM25 (tokenise, stem, drop stop words, TF saturation); IDF is the store's."""

    def __init__(self) -> None:
        from qdrant_edge import Bm25, Bm25Config

        self._bm25 = Bm25(Bm25Config(language="english"))

    def document(self, text: str) -> tuple[list[int], list[float]]:
        v = self._bm25.embed_document(text)
        return list(v.indices), list(v.values)

    def query(self, text: str) -> tuple[list[int], list[float]]:
        v = self._bm25.embed_query(text)
        return list(v.indices), list(v.values)


@runtime_checkable
class DocumentStore(Protocol):
    """One collection of passages: dense (cosine) + BM25 vectors, payload filters."""

    collection: str
    dim: int

    def exists(self) -> bool:
        """Whether the collection has been created (by a first upsert)."""
        ...

    def upsert(self, docs: Sequence[SplitDocument], vectors: Sequence[np.ndarray]) -> int:
        """Replace each document (all its passages); `vectors[i]` is (passages, dim).

        Returns the number of passages written.
        """
        ...

    def get(self, doc_id: str) -> DocumentOut: ...

    def delete(self, doc_id: str) -> None: ...

    def search(
        self,
        *,
        vector: np.ndarray | None,
        text: str,
        top_k: int,
        filters: Filters | None = None,
        mode: RetrievalMode = "dense",
    ) -> list[RetrievedDocument]: ...

    def count(self) -> int:
        """Documents (not passages)."""
        ...

    def info(self) -> ModelInfo: ...

    def close(self) -> None: ...


# --- Qdrant Edge -------------------------------------------------------------------------


class _SharedShard:
    """One open EdgeShard per directory per process: a second open of its WAL would fail."""

    _lock = threading.Lock()
    _open: ClassVar[dict[Path, list[Any]]] = {}  # path -> [shard, refcount, write lock]

    @classmethod
    def acquire(cls, path: Path, config: Any) -> tuple[Any, threading.RLock]:
        from qdrant_edge import EdgeShard

        with cls._lock:
            entry = cls._open.get(path)
            if entry is None:
                try:
                    if (path / "edge_config.json").exists():
                        shard = EdgeShard.load(str(path), config)
                    else:
                        path.mkdir(parents=True, exist_ok=True)
                        shard = EdgeShard.create(str(path), config)
                except Exception as e:
                    raise ConfigError(f"cannot open Qdrant Edge shard {path}: {e}") from e
                entry = cls._open[path] = [shard, 0, threading.RLock()]
            entry[1] += 1
            return entry[0], entry[2]

    @classmethod
    def release(cls, path: Path) -> None:
        with cls._lock:
            entry = cls._open.get(path)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del cls._open[path]
                with entry[2]:
                    entry[0].flush()
                    entry[0].close()


class EdgeStore:
    """Qdrant Edge shard under `<data_dir>/edge/<collection>`, opened lazily."""

    def __init__(
        self,
        path: Path,
        collection: str,
        dim: int,
        cfg: StoreConfig,
        threads: int | None = None,
    ) -> None:
        self.collection = check_collection(collection)
        self.path = Path(path).resolve()
        self.dim = dim
        self.cfg = cfg
        self.threads = threads
        self._bm25 = Bm25Encoder()
        self._shard: Any = None
        self._lock: threading.RLock | None = None
        self._open_lock = threading.Lock()

    def _config(self) -> Any:
        from qdrant_edge import (
            Distance,
            EdgeConfig,
            EdgeSparseVectorParams,
            EdgeVectorParams,
            Modifier,
        )

        return EdgeConfig(
            vectors={DENSE: EdgeVectorParams(size=self.dim, distance=Distance.Cosine)},
            sparse_vectors={SPARSE: EdgeSparseVectorParams(modifier=Modifier.Idf)},
            max_search_threads=self.threads or None,
        )

    def exists(self) -> bool:
        return self._shard is not None or (self.path / "edge_config.json").exists()

    def _open(self, create: bool) -> Any:
        with self._open_lock:
            if self._shard is None:
                if not create and not self.exists():
                    return None
                shard, lock = _SharedShard.acquire(self.path, self._config())
                with lock:
                    self._ensure_indexes(shard)
                self._shard, self._lock = shard, lock
            return self._shard

    def _ensure_indexes(self, shard: Any) -> None:
        from qdrant_edge import PayloadSchemaType, UpdateOperation

        wanted = {"doc_id": PayloadSchemaType.Keyword, "passage": PayloadSchemaType.Integer}
        for key in self.cfg.indexed_fields:
            wanted[meta_path(key)] = PayloadSchemaType.Keyword
        have = shard.info().payload_schema
        for field_name, schema in wanted.items():
            if field_name not in have:
                shard.update(UpdateOperation.create_field_index(field_name, schema))

    # filters: Edge's MatchValue reads a Python bool as the int 1; numpy.bool_ stays a bool.
    @staticmethod
    def _match(path: str, v: Any) -> Any:
        from qdrant_edge import FieldCondition, MatchValue, RangeFloat

        if isinstance(v, bool):
            return FieldCondition(path, match=MatchValue(np.bool_(v)))
        if isinstance(v, float):
            return FieldCondition(path, range=RangeFloat(gte=v, lte=v))
        return FieldCondition(path, match=MatchValue(v))

    def _filter(self, filters: Filters | None, *extra: Any) -> Any:
        from qdrant_edge import FieldCondition, Filter, MatchAny

        must = list(extra)
        for c in _conditions(filters):
            if len(c.values) == 1:
                must.append(self._match(c.path, c.values[0]))
            elif all(isinstance(v, str) for v in c.values) or all(
                isinstance(v, int) and not isinstance(v, bool) for v in c.values
            ):
                must.append(FieldCondition(c.path, match=MatchAny(list(c.values))))
            else:
                must.append(Filter(should=[self._match(c.path, v) for v in c.values]))
        return Filter(must=must) if must else None

    def _doc_cond(self, doc_id: str) -> Any:
        from qdrant_edge import FieldCondition, MatchValue

        return FieldCondition("doc_id", match=MatchValue(doc_id))

    def upsert(self, docs: Sequence[SplitDocument], vectors: Sequence[np.ndarray]) -> int:
        from qdrant_edge import FieldCondition, Filter, Point, RangeFloat, SparseVector
        from qdrant_edge import UpdateOperation as Op

        _check_vectors(docs, vectors, self.dim)
        docs, vectors = _last_wins(docs, vectors)
        points = []
        for doc, vec in zip(docs, vectors, strict=True):
            for p, v in zip(doc.passages, vec, strict=True):
                idx, val = self._bm25.document(p.text)
                named = {DENSE: v.astype(np.float32).tolist()}
                if idx:
                    named[SPARSE] = SparseVector(idx, val)
                points.append(Point(point_id(doc.id, p.number), named, _payload(doc, p)))
        shard = self._open(create=True)
        assert self._lock is not None
        with self._lock:
            ids = [point_id(d.id, 0) for d in docs]
            existed = {r.payload["doc_id"] for r in shard.retrieve(ids, True, False) if r.payload}
            for batch in _batches(points):
                shard.update(Op.upsert_points(batch))
            for doc in docs:
                if doc.id in existed:  # drop passages beyond the new length
                    stale = FieldCondition("passage", range=RangeFloat(gte=len(doc.passages)))
                    shard.update(
                        Op.delete_points_by_filter(Filter(must=[self._doc_cond(doc.id), stale]))
                    )
            shard.flush()
        return len(points)

    def get(self, doc_id: str) -> DocumentOut:
        shard = self._open(create=False)
        if shard is None:
            raise DocumentNotFound(f"no document with id {doc_id!r}", field="id")
        records = shard.retrieve([point_id(doc_id, 0)], True, False)
        return _doc_out(doc_id, records[0].payload if records else None)

    def delete(self, doc_id: str) -> None:
        from qdrant_edge import Filter
        from qdrant_edge import UpdateOperation as Op

        self.get(doc_id)  # DocumentNotFound if absent
        assert self._lock is not None
        with self._lock:
            self._shard.update(Op.delete_points_by_filter(Filter(must=[self._doc_cond(doc_id)])))
            self._shard.flush()

    def search(
        self,
        *,
        vector: np.ndarray | None,
        text: str,
        top_k: int,
        filters: Filters | None = None,
        mode: RetrievalMode = "dense",
    ) -> list[RetrievedDocument]:
        from qdrant_edge import Fusion, PayloadSelector, Prefetch, Query, QueryRequest, SparseVector

        flt = self._filter(filters)  # validate even when the collection is missing
        shard = self._open(create=False)
        if shard is None:
            return []
        dense = sparse = None
        if mode in ("dense", "hybrid"):
            if vector is None:
                raise ValueError(f"mode {mode!r} needs a query vector")
            dense = Query.Nearest(np.asarray(vector, np.float32).tolist(), using=DENSE)
        if mode in ("sparse", "hybrid"):
            idx, val = self._bm25.query(text)
            if idx:
                sparse = Query.Nearest(SparseVector(idx, val), using=SPARSE)
        payload = PayloadSelector.Exclude(_HIDDEN)
        if mode == "hybrid" and dense is not None and sparse is not None:
            depth = max(top_k * 4, 20)
            req = QueryRequest(
                limit=top_k,
                prefetches=[
                    Prefetch(limit=depth, query=dense, filter=flt),
                    Prefetch(limit=depth, query=sparse, filter=flt),
                ],
                query=Fusion.Rrf(k=RRF_K),
                filter=flt,
                with_payload=payload,
            )
        else:
            q = dense if dense is not None else sparse
            if q is None:  # only stop words in a BM25 query
                return []
            req = QueryRequest(limit=top_k, query=q, filter=flt, with_payload=payload)
        return [_hit(p.payload or {}, p.score) for p in shard.query(req)]

    def count(self) -> int:
        from qdrant_edge import CountRequest, FieldCondition, Filter, MatchValue

        shard = self._open(create=False)
        if shard is None:
            return 0
        first = Filter(must=[FieldCondition("passage", match=MatchValue(0))])
        return shard.count(CountRequest(exact=True, filter=first))

    def optimize(self) -> bool:
        """Build HNSW / vacuum deletes now (Edge has no background optimizer)."""
        shard = self._open(create=False)
        if shard is None:
            return False
        assert self._lock is not None
        with self._lock:
            return bool(shard.optimize())

    def info(self) -> ModelInfo:
        return ModelInfo(
            stage="store", model=f"qdrant-edge:{self.path}", format="qdrant-edge shard"
        )

    def close(self) -> None:
        with self._open_lock:
            if self._shard is not None:
                self._shard = None
                self._lock = None
                _SharedShard.release(self.path)


# --- qdrant-client -----------------------------------------------------------------------


class _SharedClient:
    """One QdrantClient per location: local mode on a path locks the directory."""

    _lock = threading.Lock()
    _open: ClassVar[dict[tuple[str, str | None], list[Any]]] = {}  # key -> [client, refcount, lock]

    @staticmethod
    def _connect(url: str, api_key: str | None) -> Any:
        from qdrant_client import QdrantClient

        if url == ":memory:":
            return QdrantClient(location=":memory:")
        if url.startswith("path:"):
            return QdrantClient(path=url.removeprefix("path:"))
        if url.startswith(("http://", "https://")):
            return QdrantClient(url=url, api_key=api_key)
        raise ConfigError(f"store.url {url!r}: expected http(s)://..., ':memory:' or 'path:/dir'")

    @classmethod
    def acquire(cls, url: str, api_key: str | None) -> tuple[Any, threading.RLock]:
        if url == ":memory:":  # each in-memory store is its own database
            return cls._connect(url, api_key), threading.RLock()
        key = (url, api_key)
        with cls._lock:
            entry = cls._open.get(key)
            if entry is None:
                entry = cls._open[key] = [cls._connect(url, api_key), 0, threading.RLock()]
            entry[1] += 1
            return entry[0], entry[2]

    @classmethod
    def release(cls, url: str, api_key: str | None, client: Any) -> None:
        if url == ":memory:":
            client.close()
            return
        with cls._lock:
            entry = cls._open.get((url, api_key))
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del cls._open[(url, api_key)]
                entry[0].close()


class QdrantClientStore:
    """A collection on a Qdrant server, or in qdrant-client's local mode (tests)."""

    def __init__(self, url: str, collection: str, dim: int, cfg: StoreConfig) -> None:
        self.collection = check_collection(collection)
        self.url = url
        self.dim = dim
        self.cfg = cfg
        self.local = not url.startswith(("http://", "https://"))
        self._bm25 = Bm25Encoder()
        self._client, self._lock = _SharedClient.acquire(url, cfg.api_key)
        self._exists = False

    def exists(self) -> bool:
        if not self._exists:
            with self._lock:
                self._exists = bool(self._client.collection_exists(self.collection))
        return self._exists

    def cluster_settings(self) -> dict[str, int]:
        """Sharding and replication for a new collection on a Qdrant cluster (None: the
        server's default); qdrant-client's local mode accepts and ignores them."""
        names = ("shard_number", "replication_factor", "write_consistency_factor")
        return {k: getattr(self.cfg, k) for k in names if getattr(self.cfg, k) is not None}

    def _create(self) -> None:
        from qdrant_client import models as m

        if self.exists():
            info = self._client.get_collection(self.collection)
            vectors = info.config.params.vectors
            size = vectors[DENSE].size if isinstance(vectors, dict) and DENSE in vectors else None
            if size != self.dim:
                raise ConfigError(
                    f"collection {self.collection!r} holds {size}-d vectors, the embedder "
                    f"makes {self.dim}-d ones"
                )
            return
        self._client.create_collection(
            self.collection,
            vectors_config={
                DENSE: m.VectorParams(
                    size=self.dim, distance=m.Distance.COSINE, on_disk=self.cfg.on_disk or None
                )
            },
            sparse_vectors_config={SPARSE: m.SparseVectorParams(modifier=m.Modifier.IDF)},
            **self.cluster_settings(),
        )
        if not self.local:  # local mode has no payload indexes (and warns)
            indexes = {"doc_id": m.PayloadSchemaType.KEYWORD}
            indexes["passage"] = m.PayloadSchemaType.INTEGER
            for key in self.cfg.indexed_fields:
                indexes[meta_path(key)] = m.PayloadSchemaType.KEYWORD
            for field_name, schema in indexes.items():
                self._client.create_payload_index(self.collection, field_name, schema)
        self._exists = True

    @staticmethod
    def _match(path: str, v: Any) -> Any:
        from qdrant_client import models as m

        if isinstance(v, float):
            return m.FieldCondition(key=path, range=m.Range(gte=v, lte=v))
        return m.FieldCondition(key=path, match=m.MatchValue(value=v))

    def _filter(self, filters: Filters | None, *extra: Any) -> Any:
        from qdrant_client import models as m

        must = list(extra)
        for c in _conditions(filters):
            if len(c.values) == 1:
                must.append(self._match(c.path, c.values[0]))
            elif all(isinstance(v, str) for v in c.values) or all(
                isinstance(v, int) and not isinstance(v, bool) for v in c.values
            ):
                must.append(m.FieldCondition(key=c.path, match=m.MatchAny(any=list(c.values))))
            else:
                must.append(m.Filter(should=[self._match(c.path, v) for v in c.values]))
        return m.Filter(must=must) if must else None

    @staticmethod
    def _doc_cond(doc_id: str) -> Any:
        from qdrant_client import models as m

        return m.FieldCondition(key="doc_id", match=m.MatchValue(value=doc_id))

    def upsert(self, docs: Sequence[SplitDocument], vectors: Sequence[np.ndarray]) -> int:
        from qdrant_client import models as m

        _check_vectors(docs, vectors, self.dim)
        docs, vectors = _last_wins(docs, vectors)
        points = []
        for doc, vec in zip(docs, vectors, strict=True):
            for p, v in zip(doc.passages, vec, strict=True):
                idx, val = self._bm25.document(p.text)
                named: dict[str, Any] = {DENSE: v.astype(np.float32).tolist()}
                if idx:
                    named[SPARSE] = m.SparseVector(indices=idx, values=val)
                pid = point_id(doc.id, p.number)
                points.append(m.PointStruct(id=pid, vector=named, payload=_payload(doc, p)))
        with self._lock:
            self._create()
            ids = [point_id(d.id, 0) for d in docs]
            found = self._client.retrieve(self.collection, ids, with_payload=["doc_id"])
            existed = {r.payload["doc_id"] for r in found if r.payload}
            for batch in _batches(points):
                self._client.upsert(self.collection, batch, wait=True)
            for doc in docs:
                if doc.id in existed:
                    stale = m.FieldCondition(key="passage", range=m.Range(gte=len(doc.passages)))
                    self._client.delete(
                        self.collection,
                        m.FilterSelector(filter=m.Filter(must=[self._doc_cond(doc.id), stale])),
                        wait=True,
                    )
        return len(points)

    def get(self, doc_id: str) -> DocumentOut:
        if not self.exists():
            raise DocumentNotFound(f"no document with id {doc_id!r}", field="id")
        with self._lock:
            records = self._client.retrieve(self.collection, [point_id(doc_id, 0)])
        return _doc_out(doc_id, records[0].payload if records else None)

    def delete(self, doc_id: str) -> None:
        from qdrant_client import models as m

        self.get(doc_id)
        with self._lock:
            self._client.delete(
                self.collection,
                m.FilterSelector(filter=m.Filter(must=[self._doc_cond(doc_id)])),
                wait=True,
            )

    def search(
        self,
        *,
        vector: np.ndarray | None,
        text: str,
        top_k: int,
        filters: Filters | None = None,
        mode: RetrievalMode = "dense",
    ) -> list[RetrievedDocument]:
        from qdrant_client import models as m

        flt = self._filter(filters)
        if not self.exists():
            return []
        dense = sparse = None
        if mode in ("dense", "hybrid"):
            if vector is None:
                raise ValueError(f"mode {mode!r} needs a query vector")
            dense = np.asarray(vector, np.float32).tolist()
        if mode in ("sparse", "hybrid"):
            idx, val = self._bm25.query(text)
            if idx:
                sparse = m.SparseVector(indices=idx, values=val)
        payload = m.PayloadSelectorExclude(exclude=_HIDDEN)
        if mode == "hybrid" and dense is not None and sparse is not None:
            depth = max(top_k * 4, 20)
            kwargs: dict[str, Any] = {
                "prefetch": [
                    m.Prefetch(query=dense, using=DENSE, filter=flt, limit=depth),
                    m.Prefetch(query=sparse, using=SPARSE, filter=flt, limit=depth),
                ],
                "query": m.RrfQuery(rrf=m.Rrf(k=RRF_K)),
            }
        elif dense is not None:
            kwargs = {"query": dense, "using": DENSE}
        elif sparse is not None:
            kwargs = {"query": sparse, "using": SPARSE}
        else:
            return []
        with self._lock:
            res = self._client.query_points(
                self.collection, query_filter=flt, limit=top_k, with_payload=payload, **kwargs
            )
        return [_hit(p.payload or {}, p.score) for p in res.points]

    def count(self) -> int:
        from qdrant_client import models as m

        if not self.exists():
            return 0
        first = m.Filter(must=[m.FieldCondition(key="passage", match=m.MatchValue(value=0))])
        with self._lock:
            return int(self._client.count(self.collection, count_filter=first, exact=True).count)

    def info(self) -> ModelInfo:
        where = self.url if not self.local else f"local {self.url}"
        return ModelInfo(stage="store", model=f"qdrant:{where}", format="qdrant-client")

    def close(self) -> None:
        if self._client is not None:
            _SharedClient.release(self.url, self.cfg.api_key, self._client)
            self._client = None


def make_store(
    cfg: EngineConfig, collection: str | None, dim: int, threads: int | None = None
) -> DocumentStore:
    """Edge under data_dir when `store.url` is unset, else qdrant-client at that URL."""
    name = check_collection(collection or cfg.store.collection)
    if cfg.store.url is None:
        path = Path(cfg.data_dir).expanduser() / "edge" / name
        return EdgeStore(path, name, dim, cfg.store, threads=threads or cfg.threads or None)
    return QdrantClientStore(cfg.store.url, name, dim, cfg.store)
