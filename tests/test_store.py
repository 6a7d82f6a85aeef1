"""Both document stores through the same tests, on synthetic vectors (no model loaded).

Backends: Qdrant Edge on tmp_path, qdrant-client local mode in memory and on a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qaserve.config import EngineConfig
from qaserve.deployments.passages import Passage, SplitDocument
from qaserve.deployments.store import (
    DocumentStore,
    EdgeStore,
    QdrantClientStore,
    _QdrantStore,
    make_store,
)
from qaserve.errors import BadRequest, ConfigError, DocumentNotFound

DIM = 16
BACKENDS = ["edge", "memory", "path"]


def _cfg(backend: str, tmp_path: Path, **store: object) -> EngineConfig:
    url = {"edge": None, "memory": ":memory:", "path": f"path:{tmp_path / 'qdrant'}"}[backend]
    return EngineConfig(data_dir=tmp_path / "data", store={"url": url, **store})


def _unit(seed: int, n: int = 1) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _doc(doc_id: str, texts: list[str], meta: dict | None = None) -> SplitDocument:
    meta = meta or {}
    parent = " ".join(texts)
    passages, offset = [], 0
    for i, t in enumerate(texts):
        passages.append(Passage(doc_id, i, t, offset, meta))
        offset += len(t) + 1
    return SplitDocument(doc_id, parent, meta, passages)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(backend: str, tmp_path: Path):
    s = make_store(_cfg(backend, tmp_path), "docs", DIM)
    yield s
    s.close()


def _all_hits(store: DocumentStore, **kw: Any):
    return store.search(vector=_unit(99)[0], text="", top_k=100, **kw)


def test_factory_picks_backend(backend: str, tmp_path: Path, store: DocumentStore) -> None:
    assert isinstance(store, DocumentStore)
    assert isinstance(store, EdgeStore if backend == "edge" else QdrantClientStore)
    assert isinstance(store, _QdrantStore)  # so every test here runs the one shared algorithm
    assert store.collection == "docs"


def test_unknown_collection_reads_are_empty_and_create_nothing(
    backend: str, tmp_path: Path, store: DocumentStore
) -> None:
    assert not store.exists()
    assert store.count() == 0
    assert store.search(vector=_unit(0)[0], text="anything", top_k=3, mode="hybrid") == []
    with pytest.raises(DocumentNotFound):
        store.get("nope")
    with pytest.raises(DocumentNotFound):
        store.delete("nope")
    assert not store.exists()
    assert not (tmp_path / "data" / "edge" / "docs").exists()


def test_upsert_is_idempotent_and_drops_stale_passages(store: DocumentStore) -> None:
    assert store.upsert([_doc("a", ["one", "two", "three"], {"k": "x"})], [_unit(1, 3)]) == 3
    store.upsert([_doc("b", ["other"])], [_unit(2)])
    assert store.count() == 2
    assert len(_all_hits(store)) == 4

    store.upsert([_doc("a", ["short now"], {"k": "y"})], [_unit(3)])
    assert store.count() == 2
    hits = _all_hits(store)
    assert sorted((h.id, h.passage) for h in hits) == [("a", 0), ("b", 0)]
    got = store.get("a")
    assert (got.text, got.meta) == ("short now", {"k": "y"})

    # And back up to more passages: all new ones searchable, nothing duplicated.
    store.upsert([_doc("a", ["p0", "p1"])], [_unit(4, 2)])
    assert sorted((h.id, h.passage) for h in _all_hits(store)) == [("a", 0), ("a", 1), ("b", 0)]


def test_same_id_twice_in_one_batch_keeps_the_last(store: DocumentStore) -> None:
    written = store.upsert(
        [_doc("a", ["first", "version"]), _doc("a", ["second"])], [_unit(1, 2), _unit(2)]
    )
    assert written == 1
    assert store.count() == 1
    assert store.get("a").text == "second"


def test_get_and_delete(store: DocumentStore) -> None:
    store.upsert(
        [_doc("a", ["alpha", "beta"], {"item_id": "i1"}), _doc("b", ["gamma"])],
        [_unit(1, 2), _unit(2)],
    )
    got = store.get("a")
    assert got.id == "a" and got.text == "alpha beta" and got.meta == {"item_id": "i1"}
    store.delete("a")
    assert store.count() == 1
    assert {h.id for h in _all_hits(store)} == {"b"}
    with pytest.raises(DocumentNotFound):
        store.get("a")
    with pytest.raises(DocumentNotFound):
        store.delete("a")


def test_search_hits_carry_passage_text_meta_and_number(store: DocumentStore) -> None:
    vecs = _unit(5, 2)
    store.upsert([_doc("a", ["first part", "second part"], {"item_id": "i1"})], [vecs])
    top = store.search(vector=vecs[1], text="", top_k=1)[0]
    assert (top.id, top.passage, top.text, top.meta) == ("a", 1, "second part", {"item_id": "i1"})
    assert top.score == pytest.approx(1.0, abs=1e-4)


def _meta_store(store: DocumentStore) -> None:
    rows = [
        ("a", {"item_id": "A", "stars": 5, "verified": True, "price": 9.5, "tags": ["x", "y"]}),
        ("b", {"item_id": "B", "stars": 3, "verified": False, "price": 2.0, "tags": ["y"]}),
        ("c", {"item_id": "A", "stars": 1, "verified": False, "price": 9.5, "tags": []}),
        ("d", {"item_id": 7, "stars": 5, "verified": True, "color.name": "red", "my key": 1}),
    ]
    docs = [_doc(i, [f"text of {i}"], m) for i, m in rows]
    store.upsert(docs, [_unit(10 + i) for i in range(len(docs))])


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"item_id": "A"}, {"a", "c"}),
        ({"item_id": 7}, {"d"}),
        ({"item_id": ["B", 7]}, {"b", "d"}),
        ({"stars": 5}, {"a", "d"}),
        ({"stars": [1, 3]}, {"b", "c"}),
        ({"verified": True}, {"a", "d"}),
        ({"verified": False}, {"b", "c"}),
        ({"verified": [True, False]}, {"a", "b", "c", "d"}),
        ({"price": 9.5}, {"a", "c"}),
        ({"tags": "y"}, {"a", "b"}),
        ({"item_id": "A", "verified": False}, {"c"}),  # AND across keys
        ({"item_id": ["A", "B"], "stars": [3, 5]}, {"a", "b"}),
        ({"color.name": "red"}, {"d"}),  # a dotted key is one key, not a path
        ({"my key": 1}, {"d"}),
        ({"never_set": "x"}, set()),
    ],
)
def test_filters(store: DocumentStore, filters: dict, expected: set[str]) -> None:
    _meta_store(store)
    for mode in ("dense", "hybrid"):
        hits = store.search(vector=_unit(99)[0], text="text", top_k=10, filters=filters, mode=mode)
        assert {h.id for h in hits} == expected, mode
    hits = store.search(vector=None, text="text", top_k=10, filters=filters, mode="sparse")
    assert {h.id for h in hits} == expected


def test_indexed_and_unindexed_keys_filter_alike(backend: str, tmp_path: Path) -> None:
    s = make_store(_cfg(backend, tmp_path, indexed_fields=["item_id", "stars"]), "docs", DIM)
    try:
        _meta_store(s)
        hits = _all_hits(s, filters={"stars": 5, "verified": True, "item_id": ["A", 7]})
        assert {h.id for h in hits} == {"a", "d"}
        if isinstance(s, EdgeStore):
            indexed = set(s._shard.info().payload_schema)
            assert {"doc_id", "passage", "meta.item_id", "meta.stars"} <= indexed
    finally:
        s.close()


def test_bad_filters_are_bad_requests(store: DocumentStore) -> None:
    _meta_store(store)
    bad: Any
    for bad in ({"k": []}, {"k": float("nan")}, {'a"b': 1}, {"k": [{"x": 1}]}):
        with pytest.raises(BadRequest):
            store.search(vector=_unit(1)[0], text="x", top_k=3, filters=bad)


def test_sparse_finds_exact_term_and_hybrid_fuses(store: DocumentStore) -> None:
    vecs = _unit(20, 3)
    docs = [
        _doc("dense", ["an ordinary sentence about the weather"]),
        _doc("keyword", ["the flux capacitor model zq-4411 overheats"]),
        _doc("noise", ["another ordinary sentence about lunch"]),
    ]
    store.upsert(docs, [vecs[0:1], vecs[1:2], vecs[2:3]])
    query_vec = vecs[0]  # dense points at "dense"; the text names "keyword"'s rare term
    sparse = store.search(vector=None, text="zq-4411", top_k=3, mode="sparse")
    assert sparse[0].id == "keyword" and sparse[0].score > 0
    assert [h.score for h in sparse[1:]] == [0.0, 0.0]  # filled to k: tests/test_bm25.py
    dense = store.search(vector=query_vec, text="zq-4411", top_k=1, mode="dense")
    assert [h.id for h in dense] == ["dense"]
    hybrid = store.search(vector=query_vec, text="zq-4411", top_k=2, mode="hybrid")
    assert {h.id for h in hybrid} == {"dense", "keyword"}
    # RRF, k=60: "keyword" is 1st in BM25 and in the dense list too, so it wins; "dense"
    # is 1st in the dense list only, 1/(60+0).
    assert hybrid[0].id == "keyword" and hybrid[0].score > 1 / 60
    assert hybrid[1].id == "dense" and hybrid[1].score == pytest.approx(1 / 60, abs=1e-6)
    # A query of stop words only has no BM25 terms: hybrid = dense.
    only = store.search(vector=query_vec, text="the of and", top_k=1, mode="hybrid")
    assert [h.id for h in only] == ["dense"]


def test_bad_vectors_leave_the_store_untouched(store: DocumentStore) -> None:
    store.upsert([_doc("a", ["old text"])], [_unit(1)])
    new = [_doc("a", ["new", "text"]), _doc("b", ["b text"])]
    with pytest.raises(ValueError, match="vectors"):
        store.upsert(new, [_unit(2, 2), _unit(3, 2)])  # b: 2 vectors for 1 passage
    nan = _unit(3)
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        store.upsert(new, [_unit(2, 2), nan])
    with pytest.raises(ValueError, match="vectors"):
        store.upsert(new, [_unit(2, 2), np.ones((1, DIM + 1), np.float32)])
    assert store.count() == 1
    assert store.get("a").text == "old text"
    assert [(h.id, h.passage) for h in _all_hits(store)] == [("a", 0)]


def test_invalid_collection_names(backend: str, tmp_path: Path) -> None:
    for name in ("../escape", "a/b", ".", "x" * 65):
        with pytest.raises(BadRequest):
            make_store(_cfg(backend, tmp_path), name, DIM)


@pytest.mark.parametrize("backend", ["edge", "path"])
def test_reopen_persists(backend: str, tmp_path: Path) -> None:
    cfg = _cfg(backend, tmp_path)
    vecs = _unit(7, 2)
    first = make_store(cfg, "docs", DIM)
    first.upsert(
        [_doc("a", ["one", "two"], {"item_id": "A"}), _doc("b", ["three"])], [vecs, _unit(8)]
    )
    first.delete("b")
    first.close()

    again = make_store(cfg, "docs", DIM)
    try:
        assert again.exists()
        assert again.count() == 1
        assert again.get("a").meta == {"item_id": "A"}
        top = again.search(vector=vecs[1], text="", top_k=1, filters={"item_id": "A"})
        assert (top[0].id, top[0].passage) == ("a", 1)
    finally:
        again.close()


@pytest.mark.parametrize("backend", ["edge", "path"])
def test_stores_on_one_location_share_the_shard_or_client(backend: str, tmp_path: Path) -> None:
    cfg = _cfg(backend, tmp_path)
    a, b = make_store(cfg, "docs", DIM), make_store(cfg, "docs", DIM)
    try:
        a.upsert([_doc("x", ["text"])], [_unit(1)])
        assert b.count() == 1
        a.close()
        a.close()  # a second close releases nothing more
        assert b.get("x").text == "text"  # closing one does not close the other
    finally:
        b.close()
    again = make_store(cfg, "docs", DIM)  # the last close released it: it opens afresh
    try:
        assert again.get("x").text == "text"
    finally:
        again.close()


def test_in_memory_stores_are_separate_databases(tmp_path: Path) -> None:
    cfg = _cfg("memory", tmp_path)
    a, b = make_store(cfg, "docs", DIM), make_store(cfg, "docs", DIM)
    try:
        a.upsert([_doc("x", ["text"])], [_unit(1)])
        assert (a.count(), b.count()) == (1, 0)
    finally:
        a.close()
        b.close()


def test_edge_optimize(tmp_path: Path) -> None:
    s = make_store(_cfg("edge", tmp_path), "docs", DIM)
    try:
        assert isinstance(s, EdgeStore)
        assert s.optimize() is False  # no collection yet: nothing opened or created
        assert not s.exists()
        s.upsert([_doc("a", ["one", "two"])], [_unit(1, 2)])
        s.delete("a")
        s.upsert([_doc("b", ["three"])], [_unit(2)])
        assert isinstance(s.optimize(), bool)
        assert [(h.id, h.passage) for h in _all_hits(s)] == [("b", 0)]
    finally:
        s.close()


def test_edge_rejects_a_different_dimension(tmp_path: Path) -> None:
    cfg = _cfg("edge", tmp_path)
    s = make_store(cfg, "docs", DIM)
    s.upsert([_doc("x", ["text"])], [_unit(1)])
    s.close()
    other = make_store(cfg, "docs", DIM * 2)
    with pytest.raises(ConfigError, match="vector size"):
        other.count()


def test_client_rejects_a_different_dimension(tmp_path: Path) -> None:
    cfg = _cfg("path", tmp_path)
    s = make_store(cfg, "docs", DIM)
    s.upsert([_doc("x", ["text"])], [_unit(1)])
    s.close()
    other = make_store(cfg, "docs", DIM * 2)
    try:
        with pytest.raises(ConfigError, match="16-d"):
            other.upsert([_doc("y", ["t"])], [np.ones((1, DIM * 2), np.float32)])
        assert other.count() == 1
    finally:
        other.close()


def test_bad_url_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"store\.url"):
        make_store(EngineConfig(data_dir=tmp_path, store={"url": "ftp://x"}), "docs", DIM)
