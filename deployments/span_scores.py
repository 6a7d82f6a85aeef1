"""Generative scoring of given answers: what the pipeline asks the generator stage for when the
ensemble weighs the reader's spans instead of generating (`EnsembleConfig.generator_use`).

Scoring a few short candidates by teacher forcing costs about one prompt pass; generating
costs one pass per token, so it is the cheap way to get the generator's opinion. These types
stay inside the server (no HTTP route takes them); both transports carry them to the stage.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from qaserve_client.schema import (
    MAX_GENERATOR_DOCUMENTS,
    MAX_QUESTION_CHARS,
    NonBlank,
    ReadDocument,
)

# Candidates x documents rows share one pass, each holding a copy of its document's cached
# prompt: 8 x 20 rows is the most, as for beam search (8 beams x 20 documents).
MAX_CANDIDATES = 8
MAX_CANDIDATE_CHARS = 1_000


class ScoreRequest(BaseModel):
    question: NonBlank = Field(..., max_length=MAX_QUESTION_CHARS)
    documents: list[ReadDocument] = Field(..., min_length=1, max_length=MAX_GENERATOR_DOCUMENTS)
    candidates: list[str] = Field(
        ...,
        min_length=1,
        max_length=MAX_CANDIDATES,
        description="Answers to score; '' is 'no answer' (scored as prior.NO_ANSWER_TEXT).",
    )


class SpanScore(BaseModel):
    text: str = Field(..., description="The candidate as given ('' = no answer).")
    logprob: float = Field(..., description="Sum of the marginal log-probs of its tokens.")
    tokens: int = Field(..., description="Target tokens, the end-of-answer token included.")
    mean_logprob: float = Field(..., description="logprob / tokens.")
    token_logprobs: list[float] = Field(default_factory=list)


class ScoreResponse(BaseModel):
    scores: list[SpanScore]
    document_weights: list[float] = Field(
        default_factory=list, description="p(z|x): softmax of the retriever scores."
    )
