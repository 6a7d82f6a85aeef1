"""The ensemble stage: one final answer from the reader's spans and the generated text.

Policy (documented in the README, tested in tests/test_ensemble.py):

1. The reader is the judge of answerability. When its no-answer (CLS) score beats its best
   span, the question is unanswerable: the answer is "" with source "none", whatever the
   generator wrote (the generated text is still returned under `generated`). In generative
   mode there is no reader, so the generated text stands unless it is empty.
2. A reader span whose score reaches `reader_threshold` is the answer. When the generated
   text agrees with it (token F1 >= 0.5 after SQuAD normalisation, or one contains the
   other), source is "both" and the score gains `agreement_bonus` (capped at 1).
3. A weaker span is kept only if the generator agrees with some span (source "both", the
   agreed span, boosted score); otherwise the generated text wins, scored by the
   generator's own confidence (geometric mean of its marginal token probabilities).

Extractive answers win ties because they are verifiable: they are exact substrings of a
retrieved document, with offsets the caller can highlight.

With `policy` set (a file from `qaserve fit-ensemble`), ensemble mode instead asks the learned
policy (qaserve.deployments.ensemble_policy) to pick among the reader's spans and "no answer",
from the reader's scores, retrieval, and the generator's scores of the spans
(`generator_use: score`) or its generated text (`generate`); the other modes keep the rules.
A span it picks has source "both" (both models weighed in), score = the policy's p(correct).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qaserve.config import EnsembleConfig
from qaserve.deployments.prior import is_no_answer
from qaserve.deployments.span_scores import ScoreResponse
from qaserve.errors import ConfigError
from qaserve.metrics import f1_score, normalize_answer
from qaserve_client.schema import (
    Answer,
    FinalAnswer,
    GenerateResponse,
    QueryMode,
    ReadResponse,
    RetrievedDocument,
)

if TYPE_CHECKING:
    from qaserve.deployments.ensemble_policy import LogisticPolicy

AGREEMENT_F1 = 0.5


def generator_confidence(generated: GenerateResponse) -> float:
    if not generated.tokens:
        return 0.0
    mean_logprob = sum(t.logprob for t in generated.tokens) / len(generated.tokens)
    return math.exp(mean_logprob)


def agrees(span: str, text: str) -> bool:
    a, b = normalize_answer(span), normalize_answer(text)
    if not a or not b:
        return False
    return a in b or b in a or f1_score(span, text) >= AGREEMENT_F1


class Ensemble:
    """Plain stage class; the Ray deployment wraps it unchanged."""

    def __init__(self, cfg: EnsembleConfig | None = None) -> None:
        self.cfg = cfg or EnsembleConfig()
        self.policy: LogisticPolicy | None = None
        if self.cfg.policy is not None:
            from qaserve.deployments.ensemble_policy import LogisticPolicy

            self.policy = LogisticPolicy.load(self.cfg.policy)
            if self.policy.generator_use != self.cfg.generator_use:
                raise ConfigError(
                    f"ensemble policy {self.cfg.policy} was fitted with generator_use "
                    f"{self.policy.generator_use!r}; the config says {self.cfg.generator_use!r}",
                    "ensemble.generator_use",
                )

    def combine(
        self,
        mode: QueryMode,
        read: ReadResponse | None,
        generated: GenerateResponse | None,
        scored: ScoreResponse | None = None,
        documents: Sequence[RetrievedDocument] = (),
    ) -> FinalAnswer:
        """The final answer; `scored` (the generator's scores of the reader's spans) and the
        retrieved `documents` are what a learned policy also reads."""
        if self.policy is not None and mode == "ensemble" and read is not None:
            return self._by_policy(self.policy, read, generated, scored, documents)
        gen_text = generated.text.strip() if generated else ""
        if is_no_answer(gen_text):  # the trained generator's "I do not know."
            gen_text = ""
        if mode == "generative" or read is None:
            if not gen_text or generated is None:
                return FinalAnswer(text="", source="none", score=0.0)
            return FinalAnswer(
                text=gen_text, source="generator", score=generator_confidence(generated)
            )

        spans = [a for a in read.answers if a.answer]
        null = read.no_answer_score if read.no_answer_score is not None else 0.0
        best = spans[0] if spans else None
        if best is None or null >= best.score:
            return FinalAnswer(text="", source="none", score=null)

        if best.score >= self.cfg.reader_threshold:
            if mode == "ensemble" and gen_text and agrees(best.answer, gen_text):
                return self._from_span(best, "both", best.score + self.cfg.agreement_bonus)
            return self._from_span(best, "reader", best.score)

        if mode == "extractive" or not gen_text or generated is None:
            return self._from_span(best, "reader", best.score)
        for span in spans:
            if agrees(span.answer, gen_text):
                return self._from_span(span, "both", span.score + self.cfg.agreement_bonus)
        return FinalAnswer(text=gen_text, source="generator", score=generator_confidence(generated))

    @staticmethod
    def _by_policy(
        policy: LogisticPolicy,
        read: ReadResponse,
        generated: GenerateResponse | None,
        scored: ScoreResponse | None,
        documents: Sequence[RetrievedDocument],
    ) -> FinalAnswer:
        from qaserve.deployments.ensemble_policy import candidates

        cands = candidates(read, documents, scored, generated)
        index, p = policy.choose(cands)
        span = cands.answers[index]
        if span is None:
            return FinalAnswer(text="", source="none", score=p)
        return Ensemble._from_span(span, "both", p)

    @staticmethod
    def _from_span(span: Answer, source: str, score: float) -> FinalAnswer:
        return FinalAnswer(
            text=span.answer,
            source=source,
            score=min(1.0, score),
            document_id=span.document_id,
            start=span.start,
            end=span.end,
        )
