"""The retriever stage end to end with the real packaged MiniLM encoder, on every backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qaserve.config import EmbedderConfig, EngineConfig
from qaserve.deployments.passages import PassageSplitter, document_id, split_spans
from qaserve.deployments.retriever import Embedder, Retriever, encoder_identity
from qaserve.errors import BadRequest, ConfigError, DocumentNotFound
from qaserve_client.schema import DocumentIn, ModelInfo

pytestmark = pytest.mark.slow

BACKENDS = ["edge", "memory", "path"]

REVIEWS = [
    DocumentIn(
        id="battery",
        text="The battery lasts about ten hours on a single charge, great for travel.",
        meta={"item_id": "laptop", "stars": 5},
    ),
    DocumentIn(
        id="screen",
        text="The screen is bright and sharp; colours look natural even outdoors.",
        meta={"item_id": "laptop", "stars": 4},
    ),
    DocumentIn(
        id="hotel",
        text="The hotel room was clean and the staff were friendly and helpful.",
        meta={"item_id": "hotel", "stars": 3},
    ),
    DocumentIn(
        id="pizza",
        text="The pizza crust was thin and crispy, with a generous amount of cheese.",
        meta={"item_id": "pizzeria", "stars": 5},
    ),
]

LONG_TEXT = " ".join(
    f"Paragraph {i} of the review talks about feature number {i}, and it goes on for a while "
    f"so that the text needs several passages."
    for i in range(12)
)


class FlakyEmbedder(Embedder):
    """The real encoder, failing on its n-th call (a crash half-way through an ingest)."""

    def __init__(self, base: Embedder, fail_on_call: int) -> None:
        self.__dict__.update(base.__dict__)
        self.calls = 0
        self.fail_on_call = fail_on_call

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("encoder crashed")
        return super().embed(texts)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(EmbedderConfig(batch_size=8), threads=1)


def _cfg(backend: str, tmp_path: Path, **store: object) -> EngineConfig:
    url = {"edge": None, "memory": ":memory:", "path": f"path:{tmp_path / 'qdrant'}"}[backend]
    return EngineConfig(
        data_dir=tmp_path / "data",
        threads=1,
        embedder={"batch_size": 4},
        store={"url": url, "passage_tokens": 32, "passage_overlap": 8, **store},
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def retriever(backend: str, tmp_path: Path, embedder: Embedder):
    with Retriever(_cfg(backend, tmp_path), embedder) as r:
        yield r


# --- embedder and splitting --------------------------------------------------------------


def test_embedder_returns_unit_float32_rows(embedder: Embedder) -> None:
    vecs = embedder.embed(["a red apple", "a green apple", "stock market crash"])
    assert vecs.shape == (3, embedder.dim) == (3, 384)
    assert vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    assert embedder.embed([]).shape == (0, 384)
    info = embedder.info()
    assert info.model.startswith("qaserve-retriever-subjqa") and info.size_mb and info.size_mb > 40


def test_splitter_makes_exact_overlapping_bounded_passages(embedder: Embedder) -> None:
    tok = embedder.tokenizer
    splitter = PassageSplitter(tok, max_tokens=32, overlap=8)
    doc = splitter.split(DocumentIn(id="x", text=LONG_TEXT, meta={"k": 1}))
    assert len(doc.passages) > 3
    prev_end = 0
    for i, p in enumerate(doc.passages):
        assert (p.doc_id, p.number, p.meta) == ("x", i, {"k": 1})
        assert LONG_TEXT[p.offset : p.offset + len(p.text)] == p.text
        assert len(tok(p.text, add_special_tokens=False)["input_ids"]) <= 32
        # Cut at word boundaries: every passage starts and ends next to white space.
        assert p.offset == 0 or LONG_TEXT[p.offset - 1] == " "
        end = p.offset + len(p.text)
        assert end == len(LONG_TEXT) or LONG_TEXT[end] == " "
        assert i == 0 or p.offset < prev_end  # overlaps the previous passage
        prev_end = end
    assert doc.passages[0].offset == 0 and prev_end == len(LONG_TEXT)


def test_splitter_keeps_short_text_whole_and_handles_unspaced_text(embedder: Embedder) -> None:
    splitter = PassageSplitter(embedder.tokenizer, max_tokens=16, overlap=4)
    short = splitter.split(DocumentIn(text="Short text.", meta={"a": "b"}))
    assert [(p.text, p.offset) for p in short.passages] == [("Short text.", 0)]
    assert short.id == document_id("Short text.", {"a": "b"}) != document_id("Short text.")
    cjk = "日本語のテキストです。" * 10  # no white space: cut on tokens instead
    parts = splitter.split(DocumentIn(text=cjk)).passages
    assert len(parts) > 1
    assert all(cjk[p.offset : p.offset + len(p.text)] == p.text for p in parts)


def test_split_spans_always_progresses() -> None:
    offsets = [(i, i + 1) for i in range(50)]  # one long word, one char per token
    spans = split_spans("x" * 50, offsets, max_tokens=10, overlap=9)
    assert spans[0][0] == 0 and spans[-1][1] == 50
    assert all(b - a <= 10 for a, b in spans)
    assert [a for a, _ in spans] == sorted({a for a, _ in spans})


# --- the stage, on every backend ---------------------------------------------------------


def test_ingest_then_retrieve(retriever: Retriever) -> None:
    res = retriever.ingest(REVIEWS)
    assert res.ids == ["battery", "screen", "hotel", "pizza"] and res.passages == 4
    assert retriever.count() == 4
    hits = retriever.retrieve("How long does the battery last?", top_k=2)
    assert hits[0].id == "battery" and hits[0].passage == 0
    assert hits[0].text == REVIEWS[0].text and hits[0].meta == REVIEWS[0].meta
    assert hits[0].score > hits[1].score
    info = retriever.info()  # the store; the encoder is the embedder stage's to report
    assert isinstance(info, ModelInfo) and info.stage == "store"
    assert retriever.embedder.info().stage == "retriever"


def test_ingest_is_idempotent(retriever: Retriever) -> None:
    retriever.ingest(REVIEWS)
    first = retriever.ingest([DocumentIn(id="long", text=LONG_TEXT)])
    assert first.passages > 3
    assert retriever.count() == 5

    again = retriever.ingest([DocumentIn(id="long", text=LONG_TEXT)])
    assert again.passages == first.passages and retriever.count() == 5

    retriever.ingest([DocumentIn(id="long", text="Now it is one short paragraph.")])
    assert retriever.count() == 5
    assert retriever.get("long").text == "Now it is one short paragraph."
    hits = retriever.retrieve("paragraph of the review", top_k=20)
    assert [h.passage for h in hits if h.id == "long"] == [0]

    # Without an id, the content hash makes re-sending idempotent too.
    anon = DocumentIn(text="An anonymous review.", meta={"item_id": "x"})
    ids = retriever.ingest([anon]).ids + retriever.ingest([anon]).ids
    assert ids[0] == ids[1] and retriever.count() == 6


def test_long_document_hits_are_passages_of_it(retriever: Retriever) -> None:
    retriever.ingest([DocumentIn(id="long", text=LONG_TEXT, meta={"item_id": "book"})])
    hits = retriever.retrieve("feature number 11", top_k=3)
    assert {h.id for h in hits} == {"long"}
    assert all(h.text in LONG_TEXT and h.meta == {"item_id": "book"} for h in hits)
    assert "feature number 11" in hits[0].text


def test_get_delete_and_unknown_ids(retriever: Retriever) -> None:
    retriever.ingest(REVIEWS)
    got = retriever.get("hotel")
    assert got.text == REVIEWS[2].text and got.meta == REVIEWS[2].meta
    retriever.delete("hotel")
    assert retriever.count() == 3
    assert "hotel" not in {h.id for h in retriever.retrieve("friendly staff", top_k=5)}
    for call in (retriever.get, retriever.delete):
        with pytest.raises(DocumentNotFound):
            call("hotel")


def test_filters(retriever: Retriever) -> None:
    retriever.ingest(REVIEWS)
    q = "the battery and the screen"
    assert {h.id for h in retriever.retrieve(q, 5, {"item_id": "hotel"})} == {"hotel"}
    any_of = retriever.retrieve(q, 5, {"item_id": ["hotel", "pizzeria"]})
    assert {h.id for h in any_of} == {"hotel", "pizza"}
    both = retriever.retrieve(q, 5, {"item_id": "laptop", "stars": 5}, mode="hybrid")
    assert [h.id for h in both] == ["battery"]
    # "stars" is not in indexed_fields: filtering on it still works.
    assert {h.id for h in retriever.retrieve(q, 5, {"stars": [3, 4]})} == {"hotel", "screen"}


def test_bm25_finds_the_exact_rare_term_dense_misses(retriever: Retriever) -> None:
    target = (
        "Shipping was quick and the box arrived intact on a rainy Tuesday. The packaging used "
        "recycled cardboard and paper tape. Inside, a sticker on the flap said qx7741 next to "
        "the barcode. The manual was printed in French and German only."
    )
    retriever.ingest(
        [
            DocumentIn(id="target", text=target),
            DocumentIn(id="near1", text="Firmware qx7714 fixed the printer."),
            DocumentIn(id="near2", text="Model qz7741 is the newer printer."),
            DocumentIn(id="near3", text="Part xq7741 replaced the toner."),
            *REVIEWS,
        ]
    )
    dense = retriever.retrieve("qx7741", top_k=3, mode="dense")
    assert dense[0].id == "near2"  # a look-alike code fools the encoder
    sparse = retriever.retrieve("qx7741", top_k=3, mode="sparse")
    assert sparse[0].id == "target"  # the only match; the rest fill to k, scored 0.0
    assert len(sparse) == 3 and [h.score for h in sparse[1:]] == [0.0, 0.0]
    hybrid = retriever.retrieve("qx7741", top_k=3, mode="hybrid")
    assert hybrid[0].id == "target"
    assert {h.id for h in hybrid[1:]} <= {h.id for h in dense}  # fused from both lists


def test_failed_ingest_leaves_prior_documents_intact(
    backend: str, tmp_path: Path, embedder: Embedder
) -> None:
    cfg = _cfg(backend, tmp_path)
    flaky = FlakyEmbedder(embedder, fail_on_call=3)  # 1: first ingest; 2-3: second ingest
    with Retriever(cfg, flaky) as r:
        r.ingest(REVIEWS)  # one batch of 4
        update = [
            DocumentIn(id="battery", text="Replaced text that must never be stored."),
            *[DocumentIn(id=f"new{i}", text=f"New review number {i}.") for i in range(6)],
        ]
        with pytest.raises(RuntimeError, match="encoder crashed"):
            r.ingest(update)  # batches of 4: the second one fails
        assert flaky.calls == 3
        assert r.count() == 4
        assert r.get("battery").text == REVIEWS[0].text
        with pytest.raises(DocumentNotFound):
            r.get("new0")


def test_unknown_collection_reads(retriever: Retriever, tmp_path: Path) -> None:
    assert retriever.retrieve("anything", collection="nowhere", mode="hybrid") == []
    assert retriever.count("nowhere") == 0
    with pytest.raises(DocumentNotFound):
        retriever.get("x", collection="nowhere")
    assert not (tmp_path / "data" / "edge" / "nowhere").exists()


def test_collections_are_separate(retriever: Retriever) -> None:
    retriever.ingest(REVIEWS[:2], collection="laptops")
    retriever.ingest(REVIEWS[2:], collection="places")
    assert retriever.count("laptops") == 2 and retriever.count("places") == 2
    assert retriever.count() == 0
    assert {h.id for h in retriever.retrieve("staff", 5, collection="places")} == {"hotel", "pizza"}


def test_bad_arguments(retriever: Retriever) -> None:
    with pytest.raises(BadRequest):
        retriever.retrieve("q", mode="fuzzy")  # type: ignore[arg-type]  # a bad mode on purpose
    with pytest.raises(BadRequest):
        retriever.retrieve("q", top_k=0)
    with pytest.raises(BadRequest):
        retriever.retrieve("   ")
    with pytest.raises(BadRequest):
        retriever.ingest(REVIEWS, collection="../etc")


def test_progress_bar(retriever: Retriever, capsys: pytest.CaptureFixture[str]) -> None:
    retriever.ingest(REVIEWS, progress=True)
    assert "embedding" in capsys.readouterr().err


def test_edge_retriever_reopens(tmp_path: Path, embedder: Embedder) -> None:
    cfg = _cfg("edge", tmp_path)
    with Retriever(cfg, embedder) as r:
        r.ingest([*REVIEWS, DocumentIn(id="long", text=LONG_TEXT)])
        before = r.retrieve("crispy cheese", top_k=3, mode="hybrid")
    with Retriever(cfg, embedder) as r:
        assert r.count() == 5
        assert r.get("long").text == LONG_TEXT
        assert r.retrieve("crispy cheese", top_k=3, mode="hybrid") == before


def test_a_query_without_a_mode_gets_the_configured_one(
    backend: str, tmp_path: Path, embedder: Embedder
) -> None:
    """The server owns the default retrieval mode (store.retrieval); a query may pick."""
    docs = [
        DocumentIn(
            id="target",
            text="Shipping was quick and the box arrived intact on a rainy Tuesday. The "
            "packaging used recycled cardboard and paper tape. Inside, a sticker on the flap "
            "said qx7741 next to the barcode. The manual was printed in French and German only.",
        ),
        DocumentIn(id="near1", text="Firmware qx7714 fixed the printer."),
        DocumentIn(id="near2", text="Model qz7741 is the newer printer."),
        DocumentIn(id="near3", text="Part xq7741 replaced the toner."),
        *REVIEWS,
    ]
    with Retriever(_cfg(backend, tmp_path, retrieval="sparse"), embedder) as r:
        r.ingest(docs)
        default = r.retrieve("qx7741", top_k=3)
        assert [h.id for h in default] == [h.id for h in r.retrieve("qx7741", 3, mode="sparse")]
        assert default[0].id == "target"
        assert r.retrieve("qx7741", top_k=3, mode="dense")[0].id == "near2"


def test_a_collection_refuses_an_encoder_it_was_not_embedded_with(
    backend: str, tmp_path: Path, embedder: Embedder
) -> None:
    """Vectors of two 384-d encoders search without error and wrongly: the collection records
    its encoder and refuses another, on reads and writes, with the way out in the message."""
    if backend == "memory":
        pytest.skip("each in-memory store is its own database: nothing to reopen")
    with Retriever(_cfg(backend, tmp_path), embedder) as r:
        r.ingest(REVIEWS)
        assert r.retrieve("battery", top_k=2)
    other = _cfg(backend, tmp_path).model_copy(
        update={"embedder": EmbedderConfig(model=str(tmp_path / "my-encoder"))}
    )
    with Retriever(other, embedder) as r:
        built = encoder_identity(EmbedderConfig().model)
        with pytest.raises(ConfigError, match=f"embedded with encoder '{built}'"):
            r.retrieve("battery", top_k=2)
        with pytest.raises(ConfigError, match="re-ingest"):
            r.ingest(REVIEWS[:1])
    with Retriever(_cfg(backend, tmp_path), embedder) as r:  # the right one still reads
        assert r.retrieve("battery", top_k=2)


def test_the_packaged_encoder_has_one_name_wherever_it_is_installed() -> None:
    from qaserve.config import packaged_embedder

    assert EmbedderConfig(model="all-MiniLM-L6-v2").model == packaged_embedder()
    assert encoder_identity(packaged_embedder()) == "all-MiniLM-L6-v2"
    assert encoder_identity("sentence-transformers/all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
