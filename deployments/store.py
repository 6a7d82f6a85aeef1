"""Document stores: Qdrant Edge in-process (default) or qdrant-client (server URL / local mode).

Both keep one point per passage with the same payload layout, so they answer identically:

    doc_id, passage, offset, text, meta{...}      on every passage
    parent_text, n_passages                       on passage 0 only (what `get` returns)

One algorithm (`_QdrantStore`: upsert, get, delete, search, count, filters) drives both over a
few primitives each backend implements, so the two cannot drift apart.

Point ids are uuid5(doc id, passage number), so re-ingesting a document overwrites its
passages in place; passages beyond its new length are deleted afterwards. Everything that can
fail (vector shapes, BM25 vectors, payloads) is built before the first write, so a bad batch
never leaves the collection half-replaced.

BM25 uses Qdrant Edge's built-in embedder on both backends: the same token ids and weights as
Qdrant server's own BM25, and no fastembed (which downloads models) for qdrant-client. Each
collection records the analyser it was built with (stop words, stemming) and keeps using it, so
a config change never splits one index into two vocabularies. BM25 and hybrid results are
filled to top_k from the filtered set (`_QdrantStore._fill`): a query whose terms match few of
an item's reviews, or only stop words, still gets k reviews.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

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

log = logging.getLogger(__name__)


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


def _document_groups(
    docs: list[tuple[SplitDocument, list[Any]]], size: int
) -> Iterator[list[tuple[SplitDocument, list[Any]]]]:
    """(document, points) pairs in groups of at most `size` points, never splitting one
    document (a longer one is a group of its own, the only one a cut can leave mixed)."""
    group: list[tuple[SplitDocument, list[Any]]] = []
    count = 0
    for doc, points in docs:
        if group and count + len(points) > size:
            yield group
            group, count = [], 0
        group.append((doc, points))
        count += len(points)
    if group:
        yield group


# Function words only: Qdrant's English list also drops words that carry an opinion or a
# quantity ("not", "very", "too", "more", "most", "only", "off", "up", "down", "all", "few").
_SHORT = """a an the and or but if so as than then of to in on at by for with from into about
    is are was were be been being am do does did doing have has had having
    i me my you your he him his she her it its we us our they them their this that these those
    what which who whom whose how why when where there here can could would should will shall
    may might must just"""
SHORT_STOPWORDS = frozenset(_SHORT.split())


@dataclass(frozen=True)
class Bm25Analyser:
    """How text becomes BM25 terms; a collection records the one it was built with, since
    query terms must be made as its documents' were."""

    stopwords: str = "english"  # "english" (Qdrant's list), "short" (SHORT_STOPWORDS), "none"
    stemmer: bool = True  # English Snowball

    @classmethod
    def of(cls, cfg: StoreConfig) -> Bm25Analyser:
        return cls(cfg.bm25_stopwords, cfg.bm25_stemmer)

    def record(self) -> dict[str, Any]:
        return {"stopwords": self.stopwords, "stemmer": self.stemmer}

    @classmethod
    def from_record(cls, record: Any, collection: str) -> Bm25Analyser:
        try:
            a = cls(str(record["stopwords"]), bool(record["stemmer"]))
            a.encoder()  # a setting this version does not know
            return a
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"collection {collection!r} records a BM25 analyser this version cannot "
                f"reproduce ({record!r}); re-ingest it into a new collection"
            ) from e

    def encoder(self) -> Bm25Encoder:
        return Bm25Encoder(self)


# What collections written before the analyser was recorded were built with.
LEGACY_ANALYSER = Bm25Analyser("english", True)
# The encoder of collections written before encoders were recorded: the only default then.
LEGACY_ENCODER = "all-MiniLM-L6-v2"
_ANALYSER_KEY = "qaserve_bm25"  # collection metadata (qdrant-client) / file name (Edge)


class Bm25Encoder:
    """Qdrant's BM25 (tokenise, stem, drop stop words, TF saturation); IDF is the store's."""

    def __init__(self, analyser: Bm25Analyser = LEGACY_ANALYSER) -> None:
        from qdrant_edge import Bm25, Bm25Config, DisabledStemmer, StopwordsSet

        words = {"english": None, "short": StopwordsSet(custom=set(SHORT_STOPWORDS))}
        words["none"] = StopwordsSet()
        if analyser.stopwords not in words:
            raise ValueError(f"BM25 stop words {analyser.stopwords!r}: expected one of {[*words]}")
        config = Bm25Config(
            language="english",
            stopwords=words[analyser.stopwords],
            stemmer=None if analyser.stemmer else DisabledStemmer(),
        )
        self.analyser = analyser
        self._bm25 = Bm25(config)

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


# --- the algorithm, once for both backends -----------------------------------------------


class _Shared:
    """Open handles (shards, clients) shared per process by key and refcounted, each with the
    re-entrant write lock of all the stores on it; a key of None is not shared."""

    def __init__(self, close: Callable[[Any], None]) -> None:
        self._close = close
        self._lock = threading.Lock()
        self._open: dict[Any, list[Any]] = {}  # key -> [handle, refcount, write lock]

    def acquire(self, key: Any, connect: Callable[[], Any]) -> tuple[Any, threading.RLock]:
        if key is None:
            return connect(), threading.RLock()
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                entry = self._open[key] = [connect(), 0, threading.RLock()]
            entry[1] += 1
            return entry[0], entry[2]

    def release(self, key: Any, handle: Any) -> None:
        if key is None:
            self._close(handle)
            return
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._open[key]
                with entry[2]:  # let a write in flight finish first
                    self._close(entry[0])


class _Models(NamedTuple):
    """A backend's model constructors, called by keyword: both clients name the fields alike."""

    Filter: Callable[..., Any]
    FieldCondition: Callable[..., Any]
    MatchValue: Callable[..., Any]
    MatchAny: Callable[..., Any]
    Range: Callable[..., Any]
    SparseVector: Callable[..., Any]
    Point: Callable[..., Any]


class _QdrantStore(ABC):
    """Upsert, get, delete, search, count and filters, written once over the primitives below.

    `_lock` is the backend's re-entrant write lock, held across each write.
    """

    _lock: threading.RLock

    def __init__(
        self, collection: str, dim: int, cfg: StoreConfig, encoder: str = LEGACY_ENCODER
    ) -> None:
        self.collection = check_collection(collection)
        self.dim = dim
        self.cfg = cfg
        self.analyser = Bm25Analyser.of(cfg)  # for a new collection; see _encoder
        # The dense encoder's identity (retriever.encoder_identity): vectors from another
        # encoder of the same size would be searched without error, and wrongly.
        self.encoder = encoder
        self._encoder_checked = False
        self._bm25: Bm25Encoder | None = None
        self._m = self._models()

    @staticmethod
    @abstractmethod
    def _models() -> _Models: ...

    @abstractmethod
    def exists(self) -> bool: ...

    @abstractmethod
    def _open(self, create: bool) -> bool:
        """Make the collection usable, creating it if `create`; False: it does not exist."""

    @abstractmethod
    def _upsert_points(self, points: list[Any]) -> None: ...

    @abstractmethod
    def _delete_where(self, flt: Any) -> None: ...

    @abstractmethod
    def _flush(self) -> None:
        """Make the writes so far durable."""

    @abstractmethod
    def _retrieve(self, ids: list[str], with_payload: bool | list[str]) -> list[Any]:
        """The records (`.payload`) of those of `ids` that exist."""

    @abstractmethod
    def _query(self, flt: Any, limit: int, queries: dict[str, Any], depth: int) -> list[Any]:
        """Scored points (`.payload`, `.score`), nearest to the one {vector name: query} in
        `queries`; with two, RRF over a `depth`-deep prefetch of each."""

    @abstractmethod
    def _count(self, flt: Any) -> int: ...

    @abstractmethod
    def _scroll(self, flt: Any, limit: int) -> list[Any]:
        """Up to `limit` records (`.payload`) matching `flt`, in point-id order."""

    @abstractmethod
    def _analyser_record(self) -> Any:
        """The analyser record of the existing collection; None: it has none (built before
        analysers were recorded). A new collection records `self.analyser`."""

    def _record(self) -> dict[str, Any]:
        """What a new collection records: its BM25 analyser and its dense encoder."""
        return {**self.analyser.record(), "encoder": self.encoder}

    def _check_encoder(self) -> None:
        """Refuse an existing collection embedded by another encoder than the configured one."""
        if self._encoder_checked:
            return
        built = (self._analyser_record() or {}).get("encoder", LEGACY_ENCODER)
        if built != self.encoder:
            raise ConfigError(
                f"collection {self.collection!r} was embedded with encoder {built!r}, the "
                f"configured embedder is {self.encoder!r}: set embedder.model to the one it "
                "was built with (all-MiniLM-L6-v2 for collections written before encoders were "
                "recorded), or re-ingest into a new collection"
            )
        self._encoder_checked = True

    def _encoder(self) -> Bm25Encoder:
        """The BM25 encoder of the collection's own analyser, whatever the config says now;
        the configured one while the collection does not exist (its creation records it)."""
        if self._bm25 is not None:
            return self._bm25
        if not self.exists():
            return self.analyser.encoder()
        record = self._analyser_record()
        built = (
            LEGACY_ANALYSER if record is None else Bm25Analyser.from_record(record, self.collection)
        )
        if built != self.analyser:
            log.info(
                "collection %r was built with BM25 analyser %s, not the configured %s: using %s",
                self.collection,
                built,
                self.analyser,
                built,
            )
        self._bm25 = built.encoder()
        return self._bm25

    def _match(self, path: str, v: str | int | float | bool) -> Any:
        m = self._m
        if isinstance(v, float):  # Qdrant matches keywords, integers and bools only
            return m.FieldCondition(key=path, range=m.Range(gte=v, lte=v))
        return m.FieldCondition(key=path, match=m.MatchValue(value=v))

    def _filter(self, filters: Filters | None) -> Any:
        m = self._m
        must: list[Any] = []
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

    def upsert(self, docs: Sequence[SplitDocument], vectors: Sequence[np.ndarray]) -> int:
        m = self._m
        _check_vectors(docs, vectors, self.dim)
        docs, vectors = _last_wins(docs, vectors)
        bm25 = self._encoder()
        per_doc: list[list[Any]] = []
        for doc, vec in zip(docs, vectors, strict=True):
            points = []
            for p, v in zip(doc.passages, vec, strict=True):
                idx, val = bm25.document(p.text)
                named: dict[str, Any] = {DENSE: v.astype(np.float32).tolist()}
                if idx:
                    named[SPARSE] = m.SparseVector(indices=idx, values=val)
                pid = point_id(doc.id, p.number)
                points.append(m.Point(id=pid, vector=named, payload=_payload(doc, p)))
            per_doc.append(points)
        self._open(create=True)
        self._check_encoder()
        with self._lock:
            found = self._retrieve([point_id(d.id, 0) for d in docs], ["doc_id"])
            existed = {r.payload["doc_id"] for r in found if r.payload}
            # Whole documents per request, each followed by its stale passages' deletion: a
            # commit cut short (an error, a crash) leaves every document old or new, not mixed.
            for group in _document_groups(list(zip(docs, per_doc, strict=True)), WRITE_BATCH):
                for batch in _batches([p for _, points in group for p in points], WRITE_BATCH):
                    self._upsert_points(batch)  # more than one only for one long document
                for doc, _ in group:
                    if doc.id in existed:  # drop passages beyond the new length
                        stale = m.FieldCondition(
                            key="passage", range=m.Range(gte=len(doc.passages))
                        )
                        self._delete_where(m.Filter(must=[self._match("doc_id", doc.id), stale]))
            self._flush()
        return sum(len(points) for points in per_doc)

    def get(self, doc_id: str) -> DocumentOut:
        records = self._retrieve([point_id(doc_id, 0)], True) if self._open(create=False) else []
        return _doc_out(doc_id, records[0].payload if records else None)

    def delete(self, doc_id: str) -> None:
        self.get(doc_id)  # DocumentNotFound if absent
        with self._lock:
            self._delete_where(self._m.Filter(must=[self._match("doc_id", doc_id)]))
            self._flush()

    def search(
        self,
        *,
        vector: np.ndarray | None,
        text: str,
        top_k: int,
        filters: Filters | None = None,
        mode: RetrievalMode = "dense",
    ) -> list[RetrievedDocument]:
        flt = self._filter(filters)  # validate even when the collection is missing
        if not self._open(create=False):
            return []
        self._check_encoder()
        queries: dict[str, Any] = {}
        if mode in ("dense", "hybrid"):
            if vector is None:
                raise ValueError(f"mode {mode!r} needs a query vector")
            queries[DENSE] = np.asarray(vector, np.float32).tolist()
        if mode in ("sparse", "hybrid"):
            idx, val = self._encoder().query(text)
            if idx:
                queries[SPARSE] = self._m.SparseVector(indices=idx, values=val)
        points = self._query(flt, top_k, queries, depth=max(top_k * 4, 20)) if queries else []
        hits = [_hit(p.payload or {}, p.score) for p in points]
        if mode != "dense" and len(hits) < top_k:
            hits += self._fill(flt, hits, top_k - len(hits))
        return hits

    def _fill(self, flt: Any, hits: list[RetrievedDocument], need: int) -> list[RetrievedDocument]:
        """Up to `need` more passages of the filtered set, scored 0.0 (below every BM25 or
        RRF score, which are positive), so a BM25 query that matched few documents, or only
        stop words, still returns top_k whenever the filter holds that many.

        Passage 0 of documents not yet returned first, then other passages; each in point-id
        order (stable: point ids derive from doc id and passage number). Dense search ranks
        every point, so only sparse and hybrid (whose dense leg is `depth` deep) come here.
        """
        m = self._m
        inside = [flt] if flt is not None else []
        seen_docs = sorted({h.id for h in hits})
        not_seen = [m.FieldCondition(key="doc_id", match=m.MatchAny(any=seen_docs))] if hits else []
        first = m.Filter(must=[*inside, self._match("passage", 0)], must_not=not_seen or None)
        records = self._scroll(first, need)
        if len(records) < need:  # fewer new documents than asked: their other passages
            seen = {(h.id, h.passage) for h in hits}
            seen |= {(r.payload["doc_id"], 0) for r in records if r.payload}
            more = self._scroll(m.Filter(must=inside) if inside else None, need + len(seen))
            records += [
                r
                for r in more
                if r.payload and (r.payload["doc_id"], r.payload["passage"]) not in seen
            ]
        return [_hit(r.payload or {}, 0.0) for r in records[:need]]

    def count(self) -> int:
        if not self._open(create=False):
            return 0
        return self._count(self._m.Filter(must=[self._match("passage", 0)]))


# --- Qdrant Edge -------------------------------------------------------------------------


def _open_shard(path: Path, config: Any, record: dict[str, Any]) -> Any:
    from qdrant_edge import EdgeShard

    try:
        if (path / "edge_config.json").exists():
            return EdgeShard.load(str(path), config)
        path.mkdir(parents=True, exist_ok=True)
        _analyser_file(path).write_text(json.dumps(record))  # before the shard
        return EdgeShard.create(str(path), config)
    except Exception as e:
        raise ConfigError(f"cannot open Qdrant Edge shard {path}: {e}") from e


def _analyser_file(path: Path) -> Path:
    return path / f"{_ANALYSER_KEY}.json"


def _close_shard(shard: Any) -> None:
    shard.flush()
    shard.close()


# One open EdgeShard per directory per process: a second open of its WAL would fail.
_SHARDS = _Shared(_close_shard)


class EdgeStore(_QdrantStore):
    """Qdrant Edge shard under `<data_dir>/edge/<collection>`, opened lazily.

    Reads take no lock; writes run under the shard's `_lock`, shared by its stores.
    """

    def __init__(
        self,
        path: Path,
        collection: str,
        dim: int,
        cfg: StoreConfig,
        threads: int | None = None,
        encoder: str = LEGACY_ENCODER,
    ) -> None:
        super().__init__(collection, dim, cfg, encoder)
        self.path = Path(path).resolve()
        self.threads = threads
        self._shard: Any = None
        self._lock = threading.RLock()  # replaced by the shard's shared one on open
        self._open_lock = threading.Lock()

    def _config(self) -> Any:
        import qdrant_edge as e

        return e.EdgeConfig(
            vectors={DENSE: e.EdgeVectorParams(size=self.dim, distance=e.Distance.Cosine)},
            sparse_vectors={SPARSE: e.EdgeSparseVectorParams(modifier=e.Modifier.Idf)},
            max_search_threads=self.threads or None,
        )

    def exists(self) -> bool:
        return self._shard is not None or (self.path / "edge_config.json").exists()

    def _open(self, create: bool) -> bool:
        with self._open_lock:
            if self._shard is None:
                if not create and not self.exists():
                    return False
                config, new = self._config(), self._record()
                shard, lock = _SHARDS.acquire(
                    self.path, lambda: _open_shard(self.path, config, new)
                )
                with lock:
                    self._ensure_indexes(shard)
                self._shard, self._lock = shard, lock
            return True

    def _ensure_indexes(self, shard: Any) -> None:
        from qdrant_edge import PayloadSchemaType, UpdateOperation

        wanted = {"doc_id": PayloadSchemaType.Keyword, "passage": PayloadSchemaType.Integer}
        for key in self.cfg.indexed_fields:
            wanted[meta_path(key)] = PayloadSchemaType.Keyword
        have = shard.info().payload_schema
        for field_name, schema in wanted.items():
            if field_name not in have:
                shard.update(UpdateOperation.create_field_index(field_name, schema))

    @staticmethod
    def _models() -> _Models:
        import qdrant_edge as e

        def match_value(value: Any) -> Any:
            # Edge reads a Python bool as the int 1, and a numpy.bool_ as a bool.
            if isinstance(value, bool):
                return e.MatchValue(np.bool_(value))  # type: ignore[arg-type]  # not in its stub
            return e.MatchValue(value)

        return _Models(
            Filter=e.Filter,
            FieldCondition=e.FieldCondition,
            MatchValue=match_value,
            MatchAny=e.MatchAny,
            Range=e.RangeFloat,
            SparseVector=e.SparseVector,
            Point=e.Point,
        )

    def _upsert_points(self, points: list[Any]) -> None:
        from qdrant_edge import UpdateOperation

        self._shard.update(UpdateOperation.upsert_points(points))

    def _delete_where(self, flt: Any) -> None:
        from qdrant_edge import UpdateOperation

        self._shard.update(UpdateOperation.delete_points_by_filter(flt))

    def _flush(self) -> None:
        self._shard.flush()

    def _retrieve(self, ids: list[str], with_payload: bool | list[str]) -> list[Any]:
        return self._shard.retrieve(ids, with_payload, False)

    def _query(self, flt: Any, limit: int, queries: dict[str, Any], depth: int) -> list[Any]:
        from qdrant_edge import Fusion, PayloadSelector, Prefetch, Query, QueryRequest

        near = [Query.Nearest(q, using=name) for name, q in queries.items()]
        legs = [Prefetch(limit=depth, query=q, filter=flt) for q in near] if len(near) > 1 else None
        req = QueryRequest(
            limit=limit,
            # The stub's ScoringQueryType names Fusion but not its variant classes.
            query=Fusion.Rrf(k=RRF_K) if legs else near[0],  # type: ignore[arg-type]
            prefetches=legs,
            filter=flt,
            with_payload=PayloadSelector.Exclude(_HIDDEN),
        )
        return self._shard.query(req)

    def _count(self, flt: Any) -> int:
        from qdrant_edge import CountRequest

        return self._shard.count(CountRequest(exact=True, filter=flt))

    def _scroll(self, flt: Any, limit: int) -> list[Any]:
        from qdrant_edge import PayloadSelector, ScrollRequest

        exclude = PayloadSelector.Exclude(_HIDDEN)
        req = ScrollRequest(limit=limit, filter=flt, with_payload=exclude, with_vector=False)
        return list(self._shard.scroll(req)[0])

    def _analyser_record(self) -> Any:
        path = _analyser_file(self.path)
        return json.loads(path.read_text()) if path.exists() else None

    def optimize(self) -> bool:
        """Build HNSW / vacuum deletes now (Edge has no background optimizer)."""
        if not self._open(create=False):
            return False
        with self._lock:
            return bool(self._shard.optimize())

    def info(self) -> ModelInfo:
        return ModelInfo(
            stage="store", model=f"qdrant-edge:{self.path}", format="qdrant-edge shard"
        )

    def close(self) -> None:
        with self._open_lock:
            if self._shard is not None:
                _SHARDS.release(self.path, self._shard)
                self._shard = None


# --- qdrant-client -----------------------------------------------------------------------


def _connect(url: str, api_key: str | None) -> Any:
    from qdrant_client import QdrantClient

    if url == ":memory:":
        return QdrantClient(location=":memory:")
    if url.startswith("path:"):
        return QdrantClient(path=url.removeprefix("path:"))
    if url.startswith(("http://", "https://")):
        return QdrantClient(url=url, api_key=api_key)
    raise ConfigError(f"store.url {url!r}: expected http(s)://..., ':memory:' or 'path:/dir'")


# One QdrantClient per location: local mode on a path locks the directory.
_CLIENTS = _Shared(lambda client: client.close())


class QdrantClientStore(_QdrantStore):
    """A collection on a Qdrant server, or in qdrant-client's local mode (tests).

    Every client call runs under `_lock`: local mode is not thread-safe.
    """

    def __init__(
        self, url: str, collection: str, dim: int, cfg: StoreConfig, encoder: str = LEGACY_ENCODER
    ) -> None:
        super().__init__(collection, dim, cfg, encoder)
        self.url = url
        self.local = not url.startswith(("http://", "https://"))
        # Each in-memory store is its own database.
        self._key = None if url == ":memory:" else (url, cfg.api_key)
        self._client, self._lock = _CLIENTS.acquire(self._key, lambda: _connect(url, cfg.api_key))
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

    def _open(self, create: bool) -> bool:
        if create:
            with self._lock:
                self._create()
        return self.exists()

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
            metadata={_ANALYSER_KEY: self._record()},
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
    def _models() -> _Models:
        from qdrant_client import models as m

        return _Models(
            Filter=m.Filter,
            FieldCondition=m.FieldCondition,
            MatchValue=m.MatchValue,
            MatchAny=m.MatchAny,
            Range=m.Range,
            SparseVector=m.SparseVector,
            Point=m.PointStruct,
        )

    def _upsert_points(self, points: list[Any]) -> None:
        self._client.upsert(self.collection, points, wait=True)

    def _delete_where(self, flt: Any) -> None:
        from qdrant_client.models import FilterSelector

        self._client.delete(self.collection, FilterSelector(filter=flt), wait=True)

    def _flush(self) -> None:
        """Nothing to do: every write waited for the server (wait=True)."""

    def _retrieve(self, ids: list[str], with_payload: bool | list[str]) -> list[Any]:
        with self._lock:
            return self._client.retrieve(self.collection, ids, with_payload=with_payload)

    def _query(self, flt: Any, limit: int, queries: dict[str, Any], depth: int) -> list[Any]:
        from qdrant_client import models as m

        if len(queries) == 1:
            [(using, query)] = queries.items()
            kwargs: dict[str, Any] = {"query": query, "using": using}
        else:
            legs = [
                m.Prefetch(query=q, using=n, filter=flt, limit=depth) for n, q in queries.items()
            ]
            kwargs = {"prefetch": legs, "query": m.RrfQuery(rrf=m.Rrf(k=RRF_K))}
        payload = m.PayloadSelectorExclude(exclude=_HIDDEN)
        with self._lock:
            res = self._client.query_points(
                self.collection, query_filter=flt, limit=limit, with_payload=payload, **kwargs
            )
        return res.points

    def _count(self, flt: Any) -> int:
        with self._lock:
            return int(self._client.count(self.collection, count_filter=flt, exact=True).count)

    def _scroll(self, flt: Any, limit: int) -> list[Any]:
        from qdrant_client import models as m

        payload = m.PayloadSelectorExclude(exclude=_HIDDEN)
        with self._lock:
            records, _ = self._client.scroll(
                self.collection, scroll_filter=flt, limit=limit, with_payload=payload
            )
        return records

    def _analyser_record(self) -> Any:
        with self._lock:
            metadata = self._client.get_collection(self.collection).config.metadata
        return (metadata or {}).get(_ANALYSER_KEY)

    def info(self) -> ModelInfo:
        where = self.url if not self.local else f"local {self.url}"
        return ModelInfo(stage="store", model=f"qdrant:{where}", format="qdrant-client")

    def close(self) -> None:
        if self._client is not None:
            _CLIENTS.release(self._key, self._client)
            self._client = None


def make_store(
    cfg: EngineConfig, collection: str | None, dim: int, threads: int | None = None
) -> DocumentStore:
    """Edge under data_dir when `store.url` is unset, else qdrant-client at that URL."""
    from qaserve.deployments.retriever import encoder_identity

    name = check_collection(collection or cfg.store.collection)
    encoder = encoder_identity(cfg.embedder.model)
    if cfg.store.url is None:
        path = Path(cfg.data_dir).expanduser() / "edge" / name
        threads = threads or cfg.threads or None
        return EdgeStore(path, name, dim, cfg.store, threads=threads, encoder=encoder)
    return QdrantClientStore(cfg.store.url, name, dim, cfg.store, encoder=encoder)
