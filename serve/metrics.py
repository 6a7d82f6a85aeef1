"""SQuAD 2.0 answer metrics and retriever ranking metrics.

The answer metrics follow the official SQuAD 2.0 evaluation script: normalise (lower-case,
drop punctuation, articles and extra white space), score against every gold answer and keep
the best; an empty prediction or gold means "no answer", which only matches "no answer".
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = _tokens(prediction), _tokens(gold)
    if not pred or not ref:
        # No-answer on either side: 1 only when both say no answer.
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(
    prediction: str, golds: Sequence[str], official: bool = True
) -> tuple[float, float]:
    """Best EM and F1 of one prediction over its gold answers ('' = no answer).

    official: SQuAD 2.0's rule, empty golds drop out when some gold is non-empty (a question
    that mixes a span with "no answer" must be answered). official=False is the lenient
    best-over-every-gold score, under which "no answer" also matches such a question."""
    golds = list(golds) or [""]
    answerable = [g for g in golds if normalize_answer(g)]
    refs = (answerable or [""]) if official else golds
    em = max(exact_match(prediction, g) for g in refs)
    f1 = max(f1_score(prediction, g) for g in refs)
    return em, f1


def recall_at_k(retrieved: Sequence[str], relevant: Iterable[str], k: int) -> float:
    """1 if any relevant id is in the top k (the book's retriever recall), else 0."""
    rel = set(relevant)
    if not rel:
        raise ValueError("recall@k needs at least one relevant id")
    return float(any(r in rel for r in retrieved[:k]))


def average_precision(retrieved: Sequence[str], relevant: Iterable[str]) -> float:
    """AP over the ranked list; relevant ids never retrieved count as misses."""
    rel = set(relevant)
    if not rel:
        raise ValueError("average precision needs at least one relevant id")
    hits, total, seen = 0, 0.0, set()
    for rank, doc_id in enumerate(retrieved, start=1):
        if doc_id in rel and doc_id not in seen:
            seen.add(doc_id)
            hits += 1
            total += hits / rank
    return total / len(rel)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
