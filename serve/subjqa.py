"""Load SubjQA (and SQuAD-format JSON) into one question-per-example form.

SubjQA stores one annotation per CSV row, ends every review with an ` ANSWERNOTFOUND` marker
and writes ~19% of its answer texts re-tokenised (`awesome !` for `awesome!`) or as
non-contiguous word selections. The character indices are the reliable part, so gold
answers are taken as the review's own text at those indices; every disagreement with the
annotated text is counted in an `AlignmentReport`.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qaserve_client.schema import DocumentIn

log = logging.getLogger(__name__)

NOT_FOUND = "ANSWERNOTFOUND"
_MARKER = " " + NOT_FOUND
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class GoldAnswer:
    """One annotator's answer; the empty text (start -1) means "not in this review"."""

    text: str
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[GoldAnswer]
    item_id: str = ""
    review_id: str = ""
    domain: str = ""

    @property
    def is_impossible(self) -> bool:
        return all(not a.text for a in self.answers)

    @property
    def gold_texts(self) -> list[str]:
        return [a.text for a in self.answers]


@dataclass
class AlignmentReport:
    """How annotated answer texts compare with the review text at their indices."""

    rows: int = 0
    answer_rows: int = 0
    exact: int = 0
    whitespace_only: int = 0  # same characters bar white space: the annotator's re-tokenising
    span_differs: int = 0  # non-contiguous selection or other edit; span text used
    into_marker: int = 0  # span ran into the ` ANSWERNOTFOUND` marker: phrase kept or clipped
    stripped: int = 0  # span had surrounding white space, trimmed
    out_of_range: int = 0  # indices outside the review: answer dropped
    examples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return self.whitespace_only + self.span_differs + self.out_of_range


def _no_space(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _align(text: str, indices: str, context: str, report: AlignmentReport) -> GoldAnswer | None:
    report.answer_rows += 1
    start, end = ast.literal_eval(indices)
    if end > len(context):
        # Selections that run on into the end marker: a phrase + the marker (keep the phrase
        # when it sits at `start`), else clip the span to the review.
        report.into_marker += 1
        phrase = text.removesuffix(_MARKER)
        end = start + len(phrase) if context.startswith(phrase, start) else len(context)
    if not (0 <= start < end <= len(context)):
        report.out_of_range += 1
        return None
    span = context[start:end]
    if span == text:
        report.exact += 1
    elif _no_space(span) == _no_space(text):
        report.whitespace_only += 1
    else:
        report.span_differs += 1
        if len(report.examples) < 20:
            report.examples.append((text, span))
    trimmed = span.strip()
    if trimmed != span:
        report.stripped += 1
        start += len(span) - len(span.lstrip())
    if not trimmed:
        report.out_of_range += 1
        return None
    return GoldAnswer(trimmed, start)


def _resolve(paths: str | Path | Sequence[str | Path], split: str | None) -> list[Path]:
    """A CSV file, a domain folder (+split), the data root (+split: every domain), or a list.
    A domain folder may be the public repository's `<domain>/` holding `splits/`."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            if split is None:
                raise ValueError(f"{p} is a folder: name a split ({', '.join(SPLITS)})")
            if (p / f"{split}.csv").is_file():
                files.append(p / f"{split}.csv")
            elif (p / "splits" / f"{split}.csv").is_file():
                files.append(p / "splits" / f"{split}.csv")
            else:
                # the data root: ours (<domain>/split.csv) or the public repository's
                # layout (SubjQA/<domain>/splits/split.csv)
                found = sorted(p.glob(f"*/{split}.csv")) or sorted(p.glob(f"*/splits/{split}.csv"))
                if not found:
                    raise FileNotFoundError(f"no {split}.csv under {p}")
                files.extend(found)
        else:
            raise FileNotFoundError(p)
    return files


def load_subjqa(
    paths: str | Path | Sequence[str | Path],
    split: str | None = None,
    report: AlignmentReport | None = None,
) -> list[QAExample]:
    """One QAExample per `q_review_id`, in file order; pass `report` to get the alignment counts."""
    report = report if report is not None else AlignmentReport()
    examples: dict[str, QAExample] = {}
    for path in _resolve(paths, split):
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                report.rows += 1
                review = row["review"]
                context = review[: -len(_MARKER)] if review.endswith(_MARKER) else review
                qid = row["q_review_id"]
                ex = examples.get(qid)
                if ex is None:
                    ex = examples[qid] = QAExample(
                        id=qid,
                        question=row["question"].strip(),
                        context=context,
                        answers=[],
                        item_id=row["item_id"],
                        review_id=row["review_id"],
                        domain=row["domain"],
                    )
                if row["human_ans_spans"] == NOT_FOUND:
                    ex.answers.append(GoldAnswer("", -1))
                    continue
                gold = _align(row["human_ans_spans"], row["human_ans_indices"], context, report)
                if gold is not None:
                    ex.answers.append(gold)
    out = list(examples.values())
    for ex in out:
        if not ex.answers:  # every annotation dropped: treat as unanswerable
            ex.answers.append(GoldAnswer("", -1))
    log.info(
        "SubjQA: %d rows, %d questions; answers: %d exact, %d white-space only, "
        "%d span differs, %d dropped",
        report.rows,
        len(out),
        report.exact,
        report.whitespace_only,
        report.span_differs,
        report.out_of_range,
    )
    return out


def load_squad_json(path: str | Path) -> list[QAExample]:
    """SQuAD v1.1 / v2.0 JSON; an impossible question gets the single empty answer."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out: list[QAExample] = []
    for article in data["data"]:
        title = article.get("title", "")
        for p_idx, para in enumerate(article["paragraphs"]):
            context = para["context"]
            for qa in para["qas"]:
                answers = [
                    GoldAnswer(a["text"], int(a["answer_start"]))
                    for a in qa.get("answers", [])
                    if a["text"]
                ]
                if qa.get("is_impossible") or not answers:
                    answers = [GoldAnswer("", -1)]
                out.append(
                    QAExample(
                        id=str(qa["id"]),
                        question=qa["question"].strip(),
                        context=context,
                        answers=answers,
                        item_id=title,
                        review_id=f"{title}#{p_idx}",
                        domain="squad",
                    )
                )
    return out


def load_examples(paths: Iterable[str | Path], split: str | None = None) -> list[QAExample]:
    """SubjQA CSVs/folders and SQuAD JSON files, mixed."""
    out: list[QAExample] = []
    for p in map(Path, paths):
        if p.suffix.lower() == ".json":
            out.extend(load_squad_json(p))
        else:
            out.extend(load_subjqa(p, split))
    return out


def unique_reviews(examples: Iterable[QAExample]) -> list[DocumentIn]:
    """Each review once, with item_id/domain meta, for the item-filtered retrieval protocol."""
    docs: dict[str, DocumentIn] = {}
    for ex in examples:
        if ex.review_id not in docs:
            docs[ex.review_id] = DocumentIn(
                id=ex.review_id, text=ex.context, meta={"item_id": ex.item_id, "domain": ex.domain}
            )
    return list(docs.values())
