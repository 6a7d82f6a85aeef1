"""p(z|x), the RAG document prior, written once: the generator conditions on it and the
pipeline reports it (`document_weights`) without a round trip to the generator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def document_prior(documents: Sequence[Any]) -> list[float]:
    """Softmax of the documents' retriever scores; uniform when any score is missing."""
    if not documents:
        raise ValueError("at least one document is needed")
    scores = [getattr(d, "score", None) for d in documents]
    if any(s is None for s in scores):
        return [1.0 / len(documents)] * len(documents)
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]
