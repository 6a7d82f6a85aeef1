"""The book's evaluation protocol on SubjQA, shared by `eval`, `bench encoder` and
`train-retriever`, so their figures are comparable.

- The corpus is every unique review of the domain from all the splits found beside the
  evaluated one (1,615 for electronics: the book's "Loaded 1615 documents"); each question
  ranks only its own item's reviews (an `item_id` filter).
- Strict recall@k: the question's own review is in the top k.
- Book-style recall@k: a review in the top k holds a gold span; a question with no gold span
  counts as found once anything is returned (our reading of the book's evaluation). Many
  SubjQA questions mix a span with "no answer" among their annotations: `book@k` follows
  SQuAD 2.0's official rule (such a question needs a span), `book_lenient@k` counts it as
  found once anything is returned, as a "no answer" label would be.
- The baseline for both: the item's reviews in a seeded random order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qaserve.metrics import mean

KS = (1, 3, 5, 10)


@dataclass
class Domain:
    """The questions of one split and the corpus they are asked against."""

    questions: list[Any]
    reviews: list[Any]  # DocumentIn with item_id meta
    texts: dict[str, str] = field(default_factory=dict)
    by_item: dict[str, list[str]] = field(default_factory=dict)
    corpus_splits: list[str] = field(default_factory=list)


def load_domain(data: Path, split: str | None, limit: int | None = None) -> Domain:
    """A domain folder (`<domain>/{train,dev,test}.csv` or `<domain>/splits/...` as in
    megagonlabs/SubjQA: the questions of `split`, the corpus
    of every split there) or a single CSV (its questions and its reviews only)."""
    from qaserve.subjqa import SPLITS, load_subjqa, unique_reviews

    if data.is_dir() and (data / "splits").is_dir():  # the public repository's layout
        data = data / "splits"
    if data.is_dir():
        splits = [s for s in SPLITS if (data / f"{s}.csv").exists()]
        loaded = [ex for s in splits for ex in load_subjqa(data, s)]
        questions = load_subjqa(data, split)
    else:
        splits = [data.name]
        loaded = load_subjqa(data)
        questions = list(loaded)
    questions = questions[:limit] if limit else questions
    reviews = unique_reviews(loaded)
    domain = Domain(questions, reviews, corpus_splits=splits)
    for d in reviews:
        domain.texts[str(d.id)] = d.text
        domain.by_item.setdefault(str((d.meta or {})["item_id"]), []).append(str(d.id))
    return domain


def domains_in(data: Path, split: str) -> list[str]:
    """The domain folders under `data` that hold `split` (either layout of load_domain)."""
    found = []
    for d in sorted(p for p in data.iterdir() if p.is_dir()):
        if (d / f"{split}.csv").exists() or (d / "splits" / f"{split}.csv").exists():
            found.append(d.name)
    return found


def answerable(ex: Any) -> bool:
    return any(a.text for a in ex.answers)


def holds_gold(ex: Any, text: str) -> bool:
    return any(a.text and a.text in text for a in ex.answers)


def recall_table(
    ranked: Mapping[str, Sequence[str]],
    examples: Sequence[Any],
    texts: Mapping[str, str],
    ks: Sequence[int] = (1, 3, 5),
) -> dict[str, float]:
    """Strict and book-style recall@k over `examples` given each question's ranking
    (`ranked[question id]`: distinct review ids, best first)."""
    out: dict[str, float] = {}
    for k in ks:
        strict, book, lenient = [], [], []
        for ex in examples:
            top = list(ranked[ex.id])[:k]
            strict.append(float(ex.review_id in top))
            found = float(any(holds_gold(ex, texts[r]) for r in top))
            book.append(found if answerable(ex) else float(bool(top)))
            no_answer_label = any(not a.text for a in ex.answers)
            lenient.append(float(bool(top)) if no_answer_label else found)
        out[f"strict@{k}"] = round(mean(strict), 4)
        out[f"book@{k}"] = round(mean(book), 4)
        out[f"book_lenient@{k}"] = round(mean(lenient), 4)
    return out


def random_rankings(domain: Domain, seed: int = 0) -> dict[str, list[str]]:
    """Each question's item reviews in a seeded random order: the chance baseline."""
    rng = random.Random(seed)
    return {
        ex.id: rng.sample(domain.by_item[ex.item_id], len(domain.by_item[ex.item_id]))
        for ex in domain.questions
    }


def item_query(ex: Any, collection: str, mode: str, **options: Any) -> Any:
    """The protocol's query for question `ex`: its item's reviews only; options left None
    are the server's configured values."""
    from qaserve_client.schema import QueryRequest

    return QueryRequest(
        question=ex.question,
        filters={"item_id": ex.item_id},
        collection=collection,
        mode=mode,
        **{k: v for k, v in options.items() if v is not None},
    )


def served_questions(
    engine: Any,
    data: Path,
    split: str,
    domains: Sequence[str],
    limit: int | None = None,
    prefix: str = "protocol",
    progress: bool = False,
) -> Iterator[tuple[str, Any, str]]:
    """Each domain's corpus ingested into its own collection of `engine` (an in-process
    Engine), then (domain, question, collection) for each question of `split`."""
    from tqdm.auto import tqdm

    for name in domains:
        domain = load_domain(data / name, split, limit)
        collection = f"{prefix}_{name}"
        engine.ingest(domain.reviews, collection=collection, progress=progress)
        for ex in tqdm(domain.questions, desc=f"{name}/{split}", disable=not progress):
            yield name, ex, collection
