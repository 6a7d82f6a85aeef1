"""BM25 that answers: the analyser, fill-to-k, and collections built with another analyser.

Both backends (Qdrant Edge, qdrant-client local mode) through the one store algorithm.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_store import BACKENDS, DIM, _cfg, _doc, _unit

from qaserve.config import EmbedderConfig, EngineConfig
from qaserve.deployments.store import (
    Bm25Analyser,
    DocumentStore,
    EdgeStore,
    QdrantClientStore,
    make_store,
)
from qaserve.errors import ConfigError


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(backend: str, tmp_path: Path) -> Iterator[DocumentStore]:
    s = make_store(_cfg(backend, tmp_path), "docs", DIM)
    yield s
    s.close()


def _item_store(store: DocumentStore) -> None:
    """Five reviews of item A (one names the zoom lens), two of item B."""
    texts = ["the zoom lens is sharp", "battery lasts", "screen glare", "strap broke", "menus"]
    docs = [_doc(f"a{i}", [t], {"item_id": "A"}) for i, t in enumerate(texts)]
    docs += [_doc(f"b{i}", ["zoom zoom zoom"], {"item_id": "B"}) for i in range(2)]
    store.upsert(docs, [_unit(i) for i in range(len(docs))])


def test_stop_words_only_fill_to_k_within_the_filter(store: DocumentStore) -> None:
    _item_store(store)
    hits = store.search(
        vector=None, text="the of and", top_k=3, filters={"item_id": "A"}, mode="sparse"
    )
    assert len({h.id for h in hits}) == 3 and {h.id for h in hits} <= {f"a{i}" for i in range(5)}
    assert [h.score for h in hits] == [0.0] * 3
    again = store.search(
        vector=None, text="what is it", top_k=3, filters={"item_id": "A"}, mode="sparse"
    )
    assert [h.id for h in again] == [h.id for h in hits]  # a stable order
    # No filter: the whole collection; a filter holding fewer than k: all of it.
    assert len(store.search(vector=None, text="the", top_k=7, mode="sparse")) == 7
    few = store.search(vector=None, text="the", top_k=5, filters={"item_id": "B"}, mode="sparse")
    assert sorted(h.id for h in few) == ["b0", "b1"]


def test_one_match_comes_first_then_the_filter_fills(store: DocumentStore) -> None:
    _item_store(store)
    hits = store.search(vector=None, text="zoom", top_k=5, filters={"item_id": "A"}, mode="sparse")
    assert hits[0].id == "a0" and hits[0].score > 0
    assert sorted(h.id for h in hits[1:]) == ["a1", "a2", "a3", "a4"]
    assert all(h.score == 0.0 for h in hits[1:])


def test_hybrid_fills_through_its_dense_leg(store: DocumentStore) -> None:
    _item_store(store)
    hits = store.search(
        vector=_unit(1)[0], text="the of", top_k=4, filters={"item_id": "A"}, mode="hybrid"
    )
    assert len({h.id for h in hits}) == 4 and hits[0].id == "a1"  # _unit(1) is a1's vector


def test_fill_takes_distinct_documents_before_more_passages(store: DocumentStore) -> None:
    store.upsert(
        [
            _doc("x", ["zoom one", "two"], {"item_id": "C"}),
            _doc("y", ["three", "four"], {"item_id": "C"}),
        ],
        [_unit(1, 2), _unit(2, 2)],
    )
    hits = store.search(vector=None, text="zoom", top_k=3, filters={"item_id": "C"}, mode="sparse")
    assert [(h.id, h.passage) for h in hits[:2]] == [("x", 0), ("y", 0)]
    assert (hits[2].id, hits[2].score) in {("x", 0.0), ("y", 0.0)} and hits[2].passage == 1
    assert (
        len(store.search(vector=None, text="the", top_k=9, filters={"item_id": "C"}, mode="sparse"))
        == 4
    )


@pytest.mark.parametrize(
    ("stopwords", "word", "kept"),
    [
        ("short", "not", True),
        ("short", "the", False),
        ("english", "not", False),
        ("none", "the", True),
    ],
)
def test_the_analyser_keeps_the_words_chosen(
    backend: str, tmp_path: Path, stopwords: str, word: str, kept: bool
) -> None:
    s = make_store(_cfg(backend, tmp_path, bm25_stopwords=stopwords), "docs", DIM)
    try:
        s.upsert(
            [_doc("with", [f"quiet {word} loud"]), _doc("without", ["quiet loud"])],
            [_unit(1), _unit(2)],
        )
        hits = s.search(vector=None, text=word, top_k=2, mode="sparse")
        assert [h.id for h in hits if h.score > 0] == (["with"] if kept else [])
    finally:
        s.close()


def test_default_analyser_keeps_negation() -> None:
    from qaserve.config import StoreConfig

    assert Bm25Analyser.of(StoreConfig()).encoder().query("not")[0]


def _minilm(cfg: EngineConfig) -> EngineConfig:
    return cfg.model_copy(update={"embedder": EmbedderConfig(model="all-MiniLM-L6-v2")})


def _forget_record(store: DocumentStore) -> None:
    """Make a collection look like one written before analysers were recorded."""
    if isinstance(store, EdgeStore):
        (store.path / "qaserve_bm25.json").unlink()
    else:
        assert isinstance(store, QdrantClientStore)
        store._client.update_collection(store.collection, metadata={"qaserve_bm25": None})


@pytest.mark.parametrize("backend", ["edge", "path"])
@pytest.mark.parametrize("recorded", [True, False])
def test_a_collection_keeps_the_analyser_it_was_built_with(
    backend: str, tmp_path: Path, recorded: bool
) -> None:
    # Built with the English default (stemming); reopened with a config that does not stem.
    # Collections from before the records were embedded by all-MiniLM-L6-v2 (the default then).
    old = make_store(_minilm(_cfg(backend, tmp_path, bm25_stopwords="english")), "docs", DIM)
    old.upsert([_doc("old", ["batteries die"]), _doc("other", ["screen"])], [_unit(1), _unit(2)])
    if not recorded:
        _forget_record(old)
    old.close()
    new_cfg = _minilm(_cfg(backend, tmp_path, bm25_stopwords="none", bm25_stemmer=False))
    s = make_store(new_cfg, "docs", DIM)
    try:
        hits = s.search(vector=None, text="battery", top_k=2, mode="sparse")
        assert [h.id for h in hits if h.score > 0] == ["old"]  # stemmed as "batteries" was
        s.upsert([_doc("new", ["battery"])], [_unit(3)])  # written as the collection's were
        top = s.search(vector=None, text="the batteries", top_k=3, mode="sparse")
        assert {h.id for h in top if h.score > 0} == {"old", "new"}
    finally:
        s.close()
    fresh = make_store(new_cfg, "other", DIM)  # a new collection takes the configured one
    try:
        fresh.upsert([_doc("d", ["batteries"])], [_unit(4)])
        hits = fresh.search(vector=None, text="battery", top_k=1, mode="sparse")
        assert not [h for h in hits if h.score > 0]
    finally:
        fresh.close()


def test_an_unknown_recorded_analyser_is_refused(tmp_path: Path) -> None:
    s = make_store(_cfg("edge", tmp_path), "docs", DIM)
    s.upsert([_doc("a", ["text"])], [_unit(1)])
    s.close()
    assert isinstance(s, EdgeStore)
    (s.path / "qaserve_bm25.json").write_text(json.dumps({"stopwords": "klingon", "stemmer": True}))
    again = make_store(_cfg("edge", tmp_path), "docs", DIM)
    try:
        with pytest.raises(ConfigError, match="re-ingest"):
            again.search(vector=None, text="text", top_k=1, mode="sparse")
    finally:
        again.close()
