"""`qaserve eval` on the book's protocol: corpus from every split, item filter, official and
lenient scores, the two baselines. Tiny reader and generator; the packaged encoder."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from tiny_models import tiny_causal_lm_dir, tiny_reader_dir

from qaserve.cli import main
from qaserve.metrics import squad_em_f1
from qaserve.offline.protocol import load_domain, recall_table

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"


@pytest.fixture(scope="module")
def domain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture's rows as a domain folder: test, dev and train hold different reviews."""
    root = tmp_path_factory.mktemp("electronics")
    with open(FIXTURE, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    parts = {"test": rows[:6], "dev": rows[6:10], "train": rows[10:]}
    for split, part in parts.items():
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(part)
    return root


def _count(root: Path, split: str, column: str) -> int:
    with open(root / f"{split}.csv", newline="", encoding="utf-8") as f:
        return len({row[column] for row in csv.DictReader(f)})


def test_the_official_rule_drops_empty_golds_when_a_span_exists() -> None:
    golds = ["", "great sound"]
    assert squad_em_f1("", golds) == (0.0, 0.0)
    assert squad_em_f1("", golds, official=False) == (1.0, 1.0)
    assert squad_em_f1("great sound", golds) == (1.0, 1.0)
    assert squad_em_f1("", [""]) == (1.0, 1.0)


def test_the_corpus_holds_every_split_and_questions_only_the_chosen_one(domain_dir: Path) -> None:
    test = load_domain(domain_dir, "test")
    dev = load_domain(domain_dir, "dev")
    assert len(test.questions) == _count(domain_dir, "test", "q_review_id")
    assert len(dev.questions) == _count(domain_dir, "dev", "q_review_id")
    assert set(test.texts) == set(dev.texts)  # the same whole-domain corpus
    assert len(test.texts) > len({ex.review_id for ex in test.questions})
    assert test.corpus_splits == ["train", "dev", "test"]


def test_the_public_repository_layout_loads(domain_dir: Path, tmp_path: Path) -> None:
    """megagonlabs/SubjQA keeps a domain's CSVs in SubjQA/<domain>/splits/."""
    (tmp_path / "electronics").mkdir()
    (tmp_path / "electronics" / "splits").symlink_to(domain_dir)
    ours = load_domain(domain_dir, "dev")
    theirs = load_domain(tmp_path / "electronics", "dev")
    assert [q.id for q in theirs.questions] == [q.id for q in ours.questions]
    assert set(theirs.texts) == set(ours.texts)
    from qaserve.subjqa import load_subjqa

    assert len(load_subjqa(tmp_path, "train")) == len(load_subjqa(domain_dir, "train"))


def test_book_style_recall_counts_a_review_holding_a_gold_span(domain_dir: Path) -> None:
    d = load_domain(domain_dir, "test")
    answerable = next(ex for ex in d.questions if any(a.text for a in ex.answers))
    other = next(r for r in d.texts if r != answerable.review_id)
    texts = dict(d.texts)
    gold = next(a.text for a in answerable.answers if a.text)
    texts[other] = f"unrelated words. {gold}. more words"
    table = recall_table({answerable.id: [other]}, [answerable], texts, ks=(1,))
    assert table == {"strict@1": 0.0, "book@1": 1.0, "book_lenient@1": 1.0}
    table = recall_table({answerable.id: []}, [answerable], texts, ks=(1,))
    assert table == {"strict@1": 0.0, "book@1": 0.0, "book_lenient@1": 0.0}


def test_a_question_mixing_a_span_with_no_answer_needs_the_span_unless_lenient(
    domain_dir: Path,
) -> None:
    from qaserve.subjqa import GoldAnswer

    d = load_domain(domain_dir, "test")
    ex = next(ex for ex in d.questions if any(a.text for a in ex.answers))
    ex.answers = [*[a for a in ex.answers if a.text][:1], GoldAnswer("", -1)]
    wrong = next(r for r in d.texts if not any(a.text and a.text in d.texts[r] for a in ex.answers))
    table = recall_table({ex.id: [wrong]}, [ex], d.texts, ks=(1,))
    assert table == {"strict@1": 0.0, "book@1": 0.0, "book_lenient@1": 1.0}


def test_eval_runs_the_protocol_end_to_end(domain_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    reader = tiny_reader_dir(tmp_path / "reader", cache)
    generator = tiny_causal_lm_dir(tmp_path / "generator")
    argv = ["eval", str(domain_dir), "--split", "test", "--output", str(tmp_path / "out")]
    argv += ["--set", f"reader.model={reader}", "--set", "reader.optimize=false"]
    argv += ["--set", f"generator.model={generator}", "--set", f"cache_dir={cache}"]
    argv += ["--generator-limit", "2", "--max-new-tokens", "4", "--quiet", "--tag", "t"]
    argv += ["--compare-modes"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    report: dict[str, Any] = json.loads((tmp_path / "out" / "electronics-test-t.json").read_text())
    with open(FIXTURE, newline="", encoding="utf-8") as f:
        reviews = {row["review_id"] for row in csv.DictReader(f)}
    assert report["reviews_indexed"] == len(reviews)  # every split's, not only test's
    assert report["questions"] == _count(domain_dir, "test", "q_review_id")
    assert set(report["retriever"]) == {"dense", "sparse", "hybrid", "random"}
    for row in report["retriever"].values():
        assert 0.0 <= row["strict@1"] <= row["strict@3"] <= row["strict@10"] <= 1.0
    # Every item of the fixture has one review: the item filter makes strict@1 exact.
    assert report["retriever"]["dense"]["strict@1"] == 1.0
    # Always "no answer" scores the unanswerable half only, by the official rule.
    nan = report["always_no_answer"]
    assert nan["answerable"]["f1"] == 0.0 and nan["unanswerable"]["f1"] == 1.0
    assert nan["all"]["lenient_f1"] >= nan["all"]["f1"]
    for key in ("reader", "pipeline", "random_review", "generator", "ensemble"):
        assert 0.0 <= report[key]["all"]["f1"] <= 1.0
    assert report["pipeline"]["p50_ms"] > 0
    # Ensemble and extractive latencies, question by question on the same subset.
    assert report["ensemble"]["p50_ms"] > 0 and report["pipeline_on_subset"]["p50_ms"] > 0
    assert report["ensemble"]["generator_use"] == "generate"
    assert "ensemble (generate, hand-set rules) p50" in stdout.getvalue()
    assert set(report["pipeline_by_mode"]) == {"dense", "sparse", "hybrid"}
    assert (tmp_path / "out" / "electronics-test-t-recall.png").stat().st_size > 1000
    assert "always no answer" in stdout.getvalue()


def test_the_generators_no_answer_text_scores_as_no_answer() -> None:
    """A trained generator abstains with its fixed text; scoring it as a span would count a
    correct abstention as wrong (and an abstention on an answerable question as a guess)."""
    from types import SimpleNamespace

    from qaserve.deployments.prior import NO_ANSWER_TEXT
    from qaserve.offline.evaluate import generated_answer

    assert generated_answer(SimpleNamespace(text=f" {NO_ANSWER_TEXT} ")) == ""
    assert generated_answer(SimpleNamespace(text="i do not know")) == ""
    assert generated_answer(None) == ""
    assert generated_answer(SimpleNamespace(text=" great sound ")) == "great sound"
