"""p(z|x), the RAG document prior, written once: the generator conditions on it and the
pipeline reports it (`document_weights`) without a round trip to the generator; and the
generation answer built from decoded tokens, the same for a plain and a streamed call."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from qaserve.metrics import normalize_answer
from qaserve_client.schema import GeneratedToken, GenerateResponse

# What a generator trained by `qaserve train-generator` answers when the documents do not
# hold the answer (its training target for unanswerable questions; the system prompt asks
# for the same). The ensemble reads it as "no answer" (is_no_answer).
NO_ANSWER_TEXT = "I do not know."


def is_no_answer(text: str) -> bool:
    """Empty, or the no-answer text (up to SQuAD normalisation: case, punctuation)."""
    norm = normalize_answer(text)
    return not norm or norm == normalize_answer(NO_ANSWER_TEXT)


def document_prior(documents: Sequence[Any]) -> list[float]:
    """Softmax of the documents' retriever scores; uniform when any score is missing."""
    if not documents:
        raise ValueError("at least one document is needed")
    scores = [getattr(d, "score", None) for d in documents]
    if any(s is None for s in scores):
        return [1.0 / len(documents)] * len(documents)
    known = [s for s in scores if s is not None]  # all of them, for the type checker
    top = max(known)
    exps = [math.exp(s - top) for s in known]
    total = sum(exps)
    return [e / total for e in exps]


def generate_response(tokens: list[GeneratedToken], documents: Sequence[Any]) -> GenerateResponse:
    """The text of the decoded tokens, with the prior they were decoded under."""
    return GenerateResponse(
        text="".join(t.text for t in tokens),
        tokens=tokens,
        document_weights=document_prior(documents),
    )
