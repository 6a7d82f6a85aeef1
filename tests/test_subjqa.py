"""SubjQA loader on a 14-row cut of electronics/train.csv (11 questions)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qaserve.subjqa import (
    AlignmentReport,
    load_examples,
    load_squad_json,
    load_subjqa,
    unique_reviews,
)

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"


@pytest.fixture(scope="module")
def examples():
    return load_subjqa(FIXTURE)


def test_rows_grouped_into_questions(examples):
    assert len(examples) == 11
    assert len({ex.id for ex in examples}) == 11
    assert sum(len(ex.answers) for ex in examples) == 14


def test_answers_sit_on_their_offsets(examples):
    for ex in examples:
        assert not ex.context.endswith("ANSWERNOTFOUND")
        for a in ex.answers:
            if a.text:
                assert ex.context[a.start : a.start + len(a.text)] == a.text
                assert a.text == a.text.strip()
            else:
                assert a.start == -1


def test_unanswerable_and_mixed_questions(examples):
    by_id = {ex.id[:8]: ex for ex in examples}
    assert by_id["81fa6a0a"].is_impossible
    assert by_id["81fa6a0a"].gold_texts == [""]
    mixed = by_id["991b7bc6"]
    assert not mixed.is_impossible
    assert sorted(mixed.gold_texts) == ["", "It does so many things"]
    assert sum(ex.is_impossible for ex in examples) == 5


def test_alignment_report_counts_and_fixes_mismatches(examples):
    report = AlignmentReport()
    load_subjqa(FIXTURE, report=report)
    assert report.rows == 14
    assert report.answer_rows == 6
    # Annotated "re - chargeables" (re-tokenised): the review's own "re-chargeables" is kept.
    assert report.whitespace_only == 1
    ws = next(ex for ex in examples if ex.id.startswith("a8964e8d"))
    assert ws.answers[0].text == "hold a charge longer than older style re-chargeables"
    # A selection that ran into the end marker is clipped to the review.
    assert report.into_marker == 1
    assert report.exact + report.whitespace_only + report.span_differs == report.answer_rows


def test_long_review_answer_deep_inside(examples):
    ex = next(ex for ex in examples if ex.id.startswith("8a49da85"))
    assert len(ex.context) > 3000
    assert ex.answers[0].text == "Battery life is incredible"
    assert ex.answers[0].start == 2901


def test_folder_and_split_forms(tmp_path, examples):
    (tmp_path / "electronics").mkdir()
    shutil.copy(FIXTURE, tmp_path / "electronics" / "train.csv")
    from_root = load_subjqa(tmp_path, "train")
    from_domain = load_subjqa(tmp_path / "electronics", "train")
    assert [e.id for e in from_root] == [e.id for e in from_domain] == [e.id for e in examples]
    assert {e.domain for e in from_root} == {"electronics"}
    with pytest.raises(ValueError):
        load_subjqa(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_subjqa(tmp_path, "dev")


def test_squad_json_v2(tmp_path):
    data = {
        "version": "v2.0",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "The cat sat on the mat.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where did the cat sit? ",
                                "answers": [{"text": "on the mat", "answer_start": 12}],
                            },
                            {
                                "id": "q2",
                                "question": "Who barked?",
                                "answers": [],
                                "is_impossible": True,
                            },
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    q1, q2 = load_squad_json(path)
    assert q1.question == "Where did the cat sit?"
    assert q1.context[q1.answers[0].start : q1.answers[0].end] == "on the mat"
    assert q2.is_impossible
    assert [e.id for e in load_examples([path])] == ["q1", "q2"]


def test_unique_reviews(examples):
    docs = unique_reviews(examples + examples)
    assert len(docs) == len({ex.review_id for ex in examples})
    first = docs[0]
    assert first.id == examples[0].review_id
    assert first.text == examples[0].context
    assert first.meta == {"item_id": examples[0].item_id, "domain": "electronics"}
