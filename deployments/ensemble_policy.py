"""The learned ensemble policy: a logistic model that picks the answer among the reader's spans
and "no answer", from features of both models (fitted on dev by `qaserve fit-ensemble`).

Why: the hand-set rules (deployments/ensemble.py) follow the reader whenever a span beats its
no-answer score, so the generator never changes an answer. Here each candidate gets
p(correct) = sigmoid(w . standardise(features) + b), trained with the candidate's official
SQuAD 2.0 F1 as a soft label (so p estimates its expected F1), and the policy answers the
candidate with the highest p. One model serves every domain: no domain feature, so it can be
applied to domains it was not fitted on.

Features of one candidate (a span block and a no-answer block: each is 0 on the other kind
of candidate, so a weight means one thing). Reader scores are the reader's probabilities
(p_start * p_end; the no-answer one of the best span's document); "gen" is the generator's
RAG-Token mean log-likelihood per token of the candidate (span text, or NO_ANSWER_TEXT),
from generative scoring; "prior" is p(z|x), the softmax of the retrieval scores.

    span                1 for a span
    span_reader         the span's reader score
    span_logodds        log(span score / no-answer score), clipped to +-LOGIT_CLIP
    span_rank           the span's rank among the reader's spans (0 = best)
    span_doc_prior      p(z|x) of the span's document
    span_doc_rank       retrieval rank of the span's document (0 = first)
    span_gen            gen of the span                                   (scoring)
    span_gen_vs_null    gen of the span - gen of "no answer"              (scoring)
    span_gen_best       1 if no other span has a higher gen               (scoring)
    span_agrees         1 if the generated text agrees with the span      (generation)
    null                1 for "no answer"
    null_reader         the reader's no-answer score
    null_logodds        log(no-answer score / best span score), clipped
    null_top_prior      the largest p(z|x) (how sure retrieval is)
    null_gen            gen of "no answer"                                (scoring)
    null_gen_vs_best    gen of "no answer" - the best span's gen          (scoring)
    null_generated      1 if the generated text is "no answer"            (generation)

File format (JSON, written by `LogisticPolicy.save`):

    {"kind": "logistic-policy", "version": 1,
     "generator_use": "score" | "generate",     # what the features need at serving time
     "features": [names...], "mean": [...], "scale": [...],   # standardisation
     "weights": [...], "bias": b,               # on the standardised features
     "l2": lambda, "fit": {dev figures, data, settings}}

A policy fitted with "score" features needs `ensemble.generator_use: score`, one fitted with
"generate" features needs "generate" (`Ensemble` checks at startup).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qaserve.deployments.prior import document_prior, is_no_answer
from qaserve.deployments.span_scores import ScoreResponse
from qaserve.errors import ConfigError
from qaserve_client.schema import Answer, GenerateResponse, ReadResponse, RetrievedDocument

GeneratorUse = Literal["generate", "score"]
LOGIT_CLIP = 15.0
_EPS = 1e-9
READER_FEATURES = (
    "span", "span_reader", "span_logodds", "span_rank", "span_doc_prior", "span_doc_rank",
    "null", "null_reader", "null_logodds", "null_top_prior",
)  # fmt: skip
SCORE_FEATURES = ("span_gen", "span_gen_vs_null", "span_gen_best", "null_gen", "null_gen_vs_best")
GENERATE_FEATURES = ("span_agrees", "null_generated")
FORMAT = "logistic-policy"


def feature_names(generator_use: GeneratorUse) -> tuple[str, ...]:
    extra = SCORE_FEATURES if generator_use == "score" else GENERATE_FEATURES
    return READER_FEATURES + extra


@dataclass
class Candidates:
    """One question's candidates (spans by reader rank, then None = no answer) and features."""

    answers: list[Answer | None]
    features: list[dict[str, float]] = field(default_factory=list)

    def matrix(self, names: Sequence[str]) -> np.ndarray:
        return np.array([[f[n] for n in names] for f in self.features], dtype=np.float64)

    @property
    def texts(self) -> list[str]:
        return [a.answer if a is not None else "" for a in self.answers]


def _logodds(a: float, b: float) -> float:
    value = math.log(max(a, _EPS)) - math.log(max(b, _EPS))
    return max(-LOGIT_CLIP, min(LOGIT_CLIP, value))


def candidates(
    read: ReadResponse,
    documents: Sequence[RetrievedDocument],
    scored: ScoreResponse | None = None,
    generated: GenerateResponse | None = None,
) -> Candidates:
    """Every feature the evidence allows (see the module docstring); a generator feature
    whose evidence is missing is 0."""
    from qaserve.deployments.ensemble import agrees

    spans = [a for a in read.answers if a.answer]
    null = read.no_answer_score if read.no_answer_score is not None else 0.0
    best = spans[0].score if spans else 0.0
    prior: dict[str, float] = {}
    rank: dict[str, int] = {}
    if documents:
        for i, (d, p) in enumerate(zip(documents, document_prior(documents), strict=True)):
            prior[d.id] = max(prior.get(d.id, 0.0), p)
            rank.setdefault(d.id, i)
    gen_of: dict[str, float] = {}
    if scored is not None:
        gen_of = {s.text: s.mean_logprob for s in scored.scores}
    null_gen = gen_of.get("", 0.0)
    span_gens = [gen_of.get(s.answer, 0.0) for s in spans]
    best_gen = max(span_gens) if span_gens else 0.0
    gen_text = generated.text.strip() if generated is not None else ""

    zero = dict.fromkeys(READER_FEATURES + SCORE_FEATURES + GENERATE_FEATURES, 0.0)
    out = Candidates(answers=[*spans, None])
    for i, (span, gen) in enumerate(zip(spans, span_gens, strict=True)):
        doc = span.document_id or ""
        out.features.append(
            zero
            | {
                "span": 1.0,
                "span_reader": span.score,
                "span_logodds": _logodds(span.score, null),
                "span_rank": float(i),
                "span_doc_prior": prior.get(doc, 0.0),
                "span_doc_rank": float(rank.get(doc, len(documents))),
                "span_gen": gen,
                "span_gen_vs_null": gen - null_gen if scored is not None else 0.0,
                "span_gen_best": float(scored is not None and gen >= best_gen),
                "span_agrees": float(bool(gen_text) and agrees(span.answer, gen_text)),
            }
        )
    out.features.append(
        zero
        | {
            "null": 1.0,
            "null_reader": null,
            "null_logodds": _logodds(null, best) if spans else LOGIT_CLIP,
            "null_top_prior": max(prior.values(), default=0.0),
            "null_gen": null_gen,
            "null_gen_vs_best": null_gen - best_gen if scored is not None and spans else 0.0,
            "null_generated": float(generated is not None and is_no_answer(gen_text)),
        }
    )
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for any z


@dataclass
class LogisticPolicy:
    generator_use: GeneratorUse
    features: list[str]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    l2: float = 1.0
    fit_report: dict[str, Any] = field(default_factory=dict)

    # --- deciding ---------------------------------------------------------------------------

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """p(correct) of each row of raw (unstandardised) features in `self.features` order."""
        return _sigmoid(((x - self.mean) / self.scale) @ self.weights + self.bias)

    def choose(self, cands: Candidates) -> tuple[int, float]:
        """(index of the chosen candidate, its p); the first of equals (reader order) wins."""
        p = self.probabilities(cands.matrix(self.features))
        best = int(np.argmax(p))
        return best, float(p[best])

    # --- fitting ----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        features: Sequence[str],
        generator_use: GeneratorUse,
        l2: float = 1.0,
        iterations: int = 50,
        sample_weight: np.ndarray | None = None,
    ) -> LogisticPolicy:
        """L2-regularised logistic regression with soft labels y in [0, 1] by Newton's method
        (IRLS): the objective is convex, so the fit is deterministic and needs no tuning.
        `sample_weight` weighs each row's loss (default 1)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or len(x) != len(y) or x.shape[1] != len(features) or len(x) == 0:
            raise ValueError(f"features {x.shape} do not match labels {y.shape} / {features}")
        s = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
        if s.shape != y.shape or np.any(s < 0):
            raise ValueError(f"sample weights {s.shape} must be >= 0, one per row")
        mean = x.mean(0)
        scale = x.std(0)
        scale[scale < 1e-12] = 1.0  # a constant feature: weight 0 under the L2 term
        z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
        w = np.zeros(z.shape[1])
        reg = np.full(z.shape[1], l2)
        reg[-1] = 0.0  # the bias is not shrunk
        for _ in range(iterations):
            p = _sigmoid(z @ w)
            grad = z.T @ (s * (p - y)) + reg * w
            hess = (z * (s * p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.max(np.abs(step)) < 1e-10:
                break
        return cls(generator_use, list(features), mean, scale, w[:-1], float(w[-1]), l2)

    # --- the file ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": FORMAT,
            "version": 1,
            "generator_use": self.generator_use,
            "features": self.features,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "bias": self.bias,
            "l2": self.l2,
            "fit": self.fit_report,
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "policy") -> LogisticPolicy:
        if data.get("kind") != FORMAT or data.get("version") != 1:
            raise ConfigError(f"{where}: not a {FORMAT} v1 file", "ensemble.policy")
        names = list(data["features"])
        use = data["generator_use"]
        known = set(feature_names(use)) if use in ("generate", "score") else set()
        unknown = [n for n in names if n not in known]
        if not known or unknown:
            raise ConfigError(
                f"{where}: generator_use {use!r} or features {unknown} unknown", "ensemble.policy"
            )
        mean, scale, weights = (
            np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "weights")
        )
        if any(a.shape != (len(names),) for a in (mean, scale, weights)) or np.any(scale <= 0):
            raise ConfigError(f"{where}: mean/scale/weights do not match", "ensemble.policy")
        return cls(
            use,
            names,
            mean,
            scale,
            weights,
            float(data["bias"]),
            float(data.get("l2", 0.0)),
            dict(data.get("fit", {})),
        )

    @classmethod
    def load(cls, path: Path) -> LogisticPolicy:
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_dict(data, str(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"cannot load ensemble policy {path}: {exc}", "ensemble.policy"
            ) from exc
