"""`qaserve train-retriever` on a tiny random sentence-transformers encoder and a SubjQA-shaped
fixture written here: pairs and batches, the loss going down, the best model serving on torch
and ONNX, and a stopped run resuming exactly where it stopped."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qaserve.cli import main
from qaserve.config import EmbedderConfig, packaged_embedder
from qaserve.deployments.encoder_onnx import OnnxEmbedder
from qaserve.deployments.passages import PassageSplitter
from qaserve.deployments.retriever import Embedder
from qaserve.errors import BadRequest
from qaserve.offline.train_retriever import (
    build_pairs,
    evaluate,
    load_dev,
    mnrl_loss,
    no_duplicate_batches,
    train_retriever,
)
from qaserve.subjqa import QAExample, load_subjqa

ASPECTS = ["battery", "screen", "sound", "price", "size"]
ADJECTIVES = ["great", "awful", "fine", "cheap", "bulky", "sharp", "loud", "weak"]
COLUMNS = [
    "item_id",
    "domain",
    "q_review_id",
    "question",
    "review_id",
    "review",
    "human_ans_spans",
    "human_ans_indices",
]


def _row(domain: str, item: str, rid: str, review: str, question: str, answer: str) -> dict:
    start = review.find(answer) if answer else -1
    return {
        "item_id": item,
        "domain": domain,
        "q_review_id": f"q-{rid}-{question}",
        "question": question,
        "review_id": rid,
        "review": review + " ANSWERNOTFOUND",
        "human_ans_spans": answer or "ANSWERNOTFOUND",
        "human_ans_indices": f"({start}, {start + len(answer)})" if answer else "(0, 0)",
    }


def write_fixture(root: Path) -> Path:
    """Two domains, four items each; reviews 0-2 train, 3 dev, 4 test. Item 3 has one train
    review; item 0's review 2 repeats review 1's text; reviews 0 and 3 of item 1 are long
    (answer at the end); one question is asked on two reviews and one has no answer."""
    for d, domain in enumerate(["alpha", "beta"]):
        rows: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
        for i in range(4):
            item = f"{domain}-item{i}"
            for j in range(5):
                aspect = ASPECTS[j]
                adj = ADJECTIVES[(i + j + d) % len(ADJECTIVES)]
                review = f"I bought this thing {i}. The {aspect} is really {adj} for me."
                if (i, j) == (0, 2):
                    review = f"I bought this thing {i}. The {ASPECTS[1]} is really " + (
                        f"{ADJECTIVES[(i + 1 + d) % len(ADJECTIVES)]} for me."
                    )
                if (i, j) in ((1, 0), (1, 3)):
                    review = "Some words about the box. " * 60 + review
                split = "train" if j < 3 else ("dev" if j == 3 else "test")
                if i == 3 and split == "train" and j > 0:
                    continue
                question = f"How is the {aspect}?"
                answer = "" if (i, j) == (2, 1) else adj
                rows[split].append(_row(domain, item, f"{item}-r{j}", review, question, answer))
                if split == "train" and j == 0:
                    rows[split].append(_row(domain, item, f"{item}-r{j}", review, "Good?", adj))
        for split, split_rows in rows.items():
            path = root / domain / f"{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(split_rows)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("subjqa"))


@pytest.fixture(scope="module")
def train(data: Path) -> list[QAExample]:
    return [ex for d in ("alpha", "beta") for ex in load_subjqa(data / d, "train")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer, 32-wide BERT over MiniLM's vocabulary as a sentence-transformers
    folder (Transformer, mean Pooling, Normalize), like the packaged encoder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-encoder")
    tokenizer = AutoTokenizer.from_pretrained(packaged_embedder())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    st = SentenceTransformer(
        modules=[
            Transformer(str(root / "hf"), max_seq_length=128),
            Pooling(32, pooling_mode="mean"),
            Normalize(),
        ],
        device="cpu",
    )
    st.save(str(root / "st"), create_model_card=False)
    return root / "st"


def _run(data: Path, out: Path, tiny: Path, **kw: Any) -> dict[str, Any]:
    opts: dict[str, Any] = dict(
        base_model=str(tiny),
        epochs=2,
        batch_size=4,
        lr=1e-3,
        hard_negatives=1,
        max_seq_length=64,
        threads=1,
        log_every=1,
        progress=False,
    )
    opts.update(kw)
    with contextlib.redirect_stdout(io.StringIO()):
        return train_retriever(data, out, **opts)


def test_hard_negatives_come_from_the_same_item_and_never_the_positive(
    train: list[QAExample],
) -> None:
    owner = {ex.review_id: (ex.domain, ex.item_id) for ex in train}
    text = {ex.review_id: ex.context for ex in train}
    pairs = build_pairs(train, 2, random.Random(0))
    assert len(pairs) == len(train)
    for p in pairs:
        assert len(p.negatives) == len(p.negative_ids) == 2
        assert p.review_id not in p.negative_ids and p.positive not in p.negatives
        assert all(text[r].strip() != p.positive.strip() for r in p.negative_ids)
        same = [r for r in p.negative_ids if owner[r] == (p.domain, p.item_id)]
        # Other items only fill what the item lacks, and from the same domain.
        assert p.other_item == 2 - len(same)
        assert all(owner[r][0] == p.domain for r in p.negative_ids)
        if p.item_id.endswith("item2"):  # three distinct train reviews: two other ones
            assert p.other_item == 0
    # item0: review 2 is review 1's text under another id: never its negative.
    r1 = next(p for p in pairs if p.review_id == "alpha-item0-r1")
    assert "alpha-item0-r2" not in r1.negative_ids and r1.other_item == 1
    lonely = [p for p in pairs if p.item_id == "alpha-item3"]
    assert lonely and all(p.other_item == 2 for p in lonely)


def test_batches_never_repeat_a_review_or_a_question(train: list[QAExample]) -> None:
    pairs = build_pairs(train, 1, random.Random(1))
    batches = no_duplicate_batches(pairs, 4, random.Random(1))
    assert sorted(id(p) for b in batches for p in b) == sorted(id(p) for p in pairs)
    for batch in batches:
        assert 1 <= len(batch) <= 4
        reviews = [r for p in batch for r in (p.review_id, *p.negative_ids)]
        questions = [p.question.lower() for p in batch]
        assert len(set(reviews)) == len(reviews) and len(set(questions)) == len(questions)


def test_window_passage_holds_the_answer(train: list[QAExample]) -> None:
    from transformers import AutoTokenizer

    splitter = PassageSplitter(AutoTokenizer.from_pretrained(packaged_embedder()), 200, 32)
    pairs = build_pairs(train, 1, random.Random(0), "window", splitter.spans)
    by_q = {(p.review_id, p.question): p for p in pairs}
    long = next(ex for ex in train if ex.review_id == "alpha-item1-r0" and ex.question != "Good?")
    spans = splitter.spans(long.context)
    assert len(spans) > 1
    window = by_q[(long.review_id, long.question)].positive
    answer = long.answers[0]
    assert long.context[answer.start : answer.end] in window
    assert window == long.context[spans[-1][0] : spans[-1][1]]  # the last window, not the head
    none = next(ex for ex in train if ex.is_impossible)
    assert by_q[(none.review_id, none.question)].positive == none.context  # short: the head


def test_dev_eval_by_windows_sees_the_end_of_a_long_review(data: Path) -> None:
    """Truncated whole, item 1's long dev review hides its answer; the store's windows don't."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(packaged_embedder(), device="cpu")
    splitter = PassageSplitter(model.tokenizer, 200, 32)
    dev = load_dev([data / "alpha"])
    assert [ex.review_id for ex in dev.examples if len(ex.context) > 1000] == ["alpha-item1-r3"]
    assert len(dev.candidates()) == 4 * 5 - 2  # every split's reviews of the dev items
    whole = evaluate(model, dev, 256)["pooled"]
    windows = evaluate(model, dev, 256, splitter.spans)["pooled"]
    assert whole["strict@3"] == 0.75 and windows["strict@3"] == 1.0, (whole, windows)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(train: list[QAExample], tiny: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = SentenceTransformer(str(tiny), device="cpu")
    loss_fn = MultipleNegativesRankingLoss(model)
    batch = no_duplicate_batches(build_pairs(train, 1, random.Random(0)), 6, random.Random(0))[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return float(mnrl_loss(model, loss_fn, batch))

    before = loss_now()
    model.train()
    for _ in range(8):
        mnrl_loss(model, loss_fn, batch).backward()
        opt.step()
        opt.zero_grad()
    assert loss_now() < 0.7 * before, before


def test_cli_keeps_the_best_dev_model_and_it_serves(data: Path, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train-retriever", "--data", str(data), "--output", str(out), "--quiet"]
    argv += ["--base-model", str(tiny), "--epochs", "2", "--batch-size", "4", "--lr", "1e-3"]
    argv += ["--max-seq-length", "64", "--threads", "1", "--eval-every", "2"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(argv) == 0
    summary = json.loads(stdout.getvalue().strip().splitlines()[-1])
    log = json.loads((out / "train_log.json").read_text())
    assert log["finished"] and log["steps"] == log["total_steps"] == summary["steps"]
    assert log["args"]["domains"] == ["alpha", "beta"]
    assert log["evals"][0]["step"] == 0 and len(log["evals"]) >= 3
    assert log["data"]["dev_questions"] == 8 and log["data"]["negatives_from_other_items"] > 0
    assert set(log["dev_random"]["domains"]) == {"alpha", "beta"}
    keys = [(e["dev"]["pooled"]["strict@1"], e["dev"]["pooled"]["strict@3"]) for e in log["evals"]]
    best = log["evals"][keys.index(max(keys))]
    assert log["best"]["step"] == best["step"] == summary["best_step"]
    assert log["losses"] and log["losses"][-1]["step"] == log["total_steps"]
    assert not (out / "checkpoint").exists()  # done: only best/ is kept
    assert "strict@1" in (out / "best" / "README.md").read_text()

    texts = ["How is the battery?", "The screen is really sharp for me."]
    vectors = Embedder(EmbedderConfig(model=str(out / "best"), batch_size=2), threads=1).embed(
        texts
    )
    assert vectors.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for runtime, floor in (("onnx-fp32", 0.9999), ("onnx-int8", 0.9)):
        cfg = EmbedderConfig(model=str(out / "best"), runtime=runtime, batch_size=2)
        onnx = OnnxEmbedder(cfg, tmp_path / "cache", threads=1).embed(texts)
        assert (onnx * vectors).sum(axis=1).min() > floor, runtime

    # The same command again: nothing to do.
    with contextlib.redirect_stdout(io.StringIO()) as again:
        assert main(argv) == 0
    assert "already trained" in again.getvalue()


def test_a_stopped_run_resumes_where_it_stopped(data: Path, tiny: Path, tmp_path: Path) -> None:
    whole = _run(data, tmp_path / "whole", tiny)
    stopped = _run(data, tmp_path / "part", tiny, stop_after=3)
    assert stopped["steps"] == 3 and not stopped.get("finished")
    assert (tmp_path / "part" / "checkpoint" / "state.pt").is_file()
    with pytest.raises(BadRequest, match="lr"):
        _run(data, tmp_path / "part", tiny, lr=5e-4)
    resumed = _run(data, tmp_path / "part", tiny)
    assert resumed["resumed_from"] == [3]
    assert resumed["steps"] == whole["steps"] == whole["total_steps"] > 3
    steps = [row["step"] for row in resumed["losses"]]
    assert steps == list(range(1, whole["total_steps"] + 1))  # continued, not restarted
    # Identical to the uninterrupted run: weights, optimizer, schedule and dropout RNG restored.
    np.testing.assert_allclose(
        [row["loss"] for row in resumed["losses"]],
        [row["loss"] for row in whole["losses"]],
        rtol=1e-4,
    )
    assert [e["dev"] for e in resumed["evals"]] == [e["dev"] for e in whole["evals"]]
