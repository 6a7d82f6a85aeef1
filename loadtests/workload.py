"""What the simulated users ask: SubjQA questions with their item filter and review.

Written once by the runner as JSON and read by every Locust worker, so the Locust process
needs neither the data set nor the models.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qaserve.subjqa import load_subjqa, unique_reviews
from qaserve_client.schema import DocumentIn

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_DATA = PACKAGE_DIR / "data" / "electronics-sample.csv"


@dataclass
class Question:
    question: str
    item_id: str
    context: str  # the question's own review: what `/v1/read` is given


@dataclass
class Workload:
    questions: list[Question]
    documents: list[dict] = field(default_factory=list)  # DocumentIn dicts, for writes

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        data = json.loads(Path(path).read_text())
        return cls([Question(**q) for q in data["questions"]], data.get("documents", []))


def from_subjqa(
    path: str | Path, split: str | None = "test", max_questions: int | None = None
) -> tuple[Workload, list[DocumentIn]]:
    """The questions of a SubjQA CSV (or a domain folder + split) and the reviews to ingest."""
    p = Path(path)
    examples = load_subjqa(p, split if p.is_dir() else None)
    if not examples:
        raise ValueError(f"{path}: no questions")
    if max_questions:
        examples = examples[:max_questions]
    docs = unique_reviews(examples)
    questions = [Question(ex.question, ex.item_id, ex.context) for ex in examples]
    return Workload(questions, [d.model_dump() for d in docs]), docs
