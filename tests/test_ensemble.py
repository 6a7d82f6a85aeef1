import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qaserve.config import EnsembleConfig
from qaserve.deployments.ensemble import Ensemble, generator_confidence
from qaserve.deployments.ensemble_policy import LogisticPolicy, candidates, feature_names
from qaserve.deployments.span_scores import ScoreResponse, SpanScore
from qaserve.errors import ConfigError
from qaserve.pipeline import score_request
from qaserve_client.schema import (
    Answer,
    GeneratedToken,
    GenerateResponse,
    QueryRequest,
    ReadDocument,
    ReadResponse,
    RetrievedDocument,
)


def read(spans, null):
    return ReadResponse(
        answers=[
            Answer(answer=a, score=s, start=0, end=len(a), document_id="d1") for a, s in spans
        ],
        no_answer_score=null,
    )


def gen(text, logprob=-0.1):
    toks = [GeneratedToken(id=i, text=w, logprob=logprob) for i, w in enumerate(text.split())]
    return GenerateResponse(text=text, tokens=toks, document_weights=[1.0])


ens = Ensemble(EnsembleConfig(reader_threshold=0.2, agreement_bonus=0.25))


def test_null_score_wins_means_unanswerable_even_if_generator_talks():
    out = ens.combine("ensemble", read([("great bass", 0.3)], null=0.5), gen("The bass is great"))
    assert out.text == "" and out.source == "none" and out.score == 0.5


def test_strong_span_is_the_answer_and_agreement_raises_confidence():
    alone = ens.combine("ensemble", read([("great bass", 0.6)], 0.1), gen("Terrible battery"))
    assert (alone.text, alone.source, alone.score) == ("great bass", "reader", 0.6)
    both = ens.combine("ensemble", read([("great bass", 0.6)], 0.1), gen("The bass is great."))
    assert both.source == "both" and both.text == "great bass"
    assert both.score > alone.score and both.score <= 1.0
    assert (both.start, both.end, both.document_id) == (0, 10, "d1")


def test_weak_span_falls_back_to_agreeing_span_or_generated_text():
    weak = read([("loud", 0.12), ("clear sound", 0.11)], 0.05)
    agreed = ens.combine("ensemble", weak, gen("clear sound"))
    assert agreed.text == "clear sound" and agreed.source == "both"
    fallback = ens.combine("ensemble", weak, gen("It works well", logprob=math.log(0.5)))
    assert fallback.text == "It works well" and fallback.source == "generator"
    assert abs(fallback.score - 0.5) < 1e-9
    # Extractive mode never uses the generator.
    assert ens.combine("extractive", weak, None).text == "loud"


def test_generative_mode():
    out = ens.combine("generative", None, gen("Twelve hours", logprob=math.log(0.8)))
    assert out.source == "generator" and out.text == "Twelve hours"
    assert abs(out.score - 0.8) < 1e-9
    assert ens.combine("generative", None, gen("")).source == "none"
    assert generator_confidence(gen("")) == 0.0


# --- the learned policy (qaserve.deployments.ensemble_policy) ---------------------------------

DOCS = [RetrievedDocument(id=f"d{i}", text=f"text {i}", score=1.0 - i / 10) for i in range(3)]


def scores(**by_text: float) -> ScoreResponse:
    return ScoreResponse(
        scores=[SpanScore(text=t, logprob=v, tokens=1, mean_logprob=v) for t, v in by_text.items()]
    )


def hand_policy(tmp_path: Path, use: str = "score", **weights: float) -> Path:
    names = feature_names(use)  # type: ignore[arg-type]
    policy = LogisticPolicy(
        use,  # type: ignore[arg-type]
        list(names),
        np.zeros(len(names)),
        np.ones(len(names)),
        np.array([weights.get(n, 0.0) for n in names]),
        bias=0.0,
    )
    path = tmp_path / f"{use}-policy.json"
    policy.save(path)
    return path


def synthetic(rng: np.random.Generator, n: int) -> tuple[list[Any], list[int]]:
    """Questions whose right answer is the generator's favourite span when it beats its
    "no answer", else no answer: a rule the reader's order alone cannot follow."""
    questions, right = [], []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        texts = [f"span {j}" for j in range(k)]
        reader = sorted(rng.uniform(0.05, 0.9, k), reverse=True)
        spans = [(t, float(s)) for t, s in zip(texts, reader, strict=True)]
        gen = {t: float(rng.normal(-3, 1)) for t in texts} | {"": float(rng.normal(-3, 1))}
        cands = candidates(read(spans, float(rng.uniform(0.05, 0.9))), DOCS, scores(**gen))
        best = max(texts, key=gen.__getitem__)
        right.append(texts.index(best) if gen[best] > gen[""] else k)
        questions.append(cands)
    return questions, right


def test_the_learned_policy_reproduces_its_saved_decisions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, right = synthetic(rng, 200)
    names = feature_names("score")
    x = np.vstack([c.matrix(names) for c in train])
    y = np.array(
        [float(i == r) for c, r in zip(train, right, strict=True) for i in range(len(c.answers))]
    )
    policy = LogisticPolicy.fit(x, y, names, "score", l2=0.1)
    # Newton converged: the regularised gradient vanishes at the fitted weights.
    z = (x - policy.mean) / policy.scale
    p = policy.probabilities(x)
    assert np.abs(z.T @ (p - y) + 0.1 * policy.weights).max() < 1e-6
    assert abs((p - y).sum()) < 1e-6  # the (unshrunk) bias
    decisions = [policy.choose(c)[0] for c in train]
    assert np.mean([d == r for d, r in zip(decisions, right, strict=True)]) >= 0.9
    assert any(d not in (0, len(c.answers) - 1) for d, c in zip(decisions, train, strict=True))

    path = tmp_path / "policy.json"
    policy.fit_report = {"note": "synthetic"}
    policy.save(path)
    loaded = LogisticPolicy.load(path)
    assert loaded.features == list(names) and loaded.fit_report == {"note": "synthetic"}
    test, _ = synthetic(np.random.default_rng(1), 50)
    for c in train + test:
        assert loaded.choose(c) == policy.choose(c)  # same candidate, same p, bit for bit


def test_the_ensemble_with_a_policy_file_picks_what_the_model_says(tmp_path: Path) -> None:
    evidence = read([("great bass", 0.6), ("loud", 0.3)], null=0.1)
    scored = scores(**{"great bass": -3.0, "loud": -1.0, "": -2.0})
    rules = Ensemble(EnsembleConfig(generator_use="score"))
    assert rules.combine("ensemble", evidence, None, scored, DOCS).text == "great bass"

    favourite = hand_policy(tmp_path, span_gen=1.0, null=-100.0)
    ens = Ensemble(EnsembleConfig(generator_use="score", policy=favourite))
    out = ens.combine("ensemble", evidence, None, scored, DOCS)
    assert (out.text, out.source, out.document_id, out.start, out.end) == (
        "loud",
        "both",
        "d1",
        0,
        4,
    )
    assert out.score == pytest.approx(1 / (1 + math.exp(1.0)))  # sigmoid(w . x), x = -1
    # The other modes keep the hand-set rules.
    assert ens.combine("extractive", evidence, None).text == "great bass"

    declines = hand_policy(tmp_path, null=1.0, span=-1.0)
    out = Ensemble(EnsembleConfig(generator_use="score", policy=declines)).combine(
        "ensemble", evidence, None, scored, DOCS
    )
    assert (out.text, out.source) == ("", "none")


def test_a_policy_that_cannot_serve_is_a_config_error(tmp_path: Path) -> None:
    generated_policy = hand_policy(tmp_path, "generate", span_agrees=1.0)
    with pytest.raises(ConfigError, match="generator_use"):
        Ensemble(EnsembleConfig(generator_use="score", policy=generated_policy))
    Ensemble(EnsembleConfig(generator_use="generate", policy=generated_policy))
    broken = tmp_path / "broken.json"
    data = json.loads(hand_policy(tmp_path).read_text())
    for bad in ({**data, "weights": [1.0]}, {**data, "features": ["nope"]}, {"kind": "x"}):
        broken.write_text(json.dumps(bad))
        with pytest.raises(ConfigError):
            Ensemble(EnsembleConfig(generator_use="score", policy=broken))
    with pytest.raises(ConfigError):
        Ensemble(EnsembleConfig(generator_use="score", policy=tmp_path / "missing.json"))


def test_features_of_the_evidence() -> None:
    evidence = read([("great bass", 0.6), ("loud", 0.3)], null=0.2)
    cands = candidates(evidence, DOCS, scores(**{"great bass": -3.0, "loud": -1.0, "": -2.0}))
    span, other, null = cands.features
    assert cands.texts == ["great bass", "loud", ""]
    assert span["span_logodds"] == pytest.approx(math.log(3)) and span["span_doc_rank"] == 1
    assert (span["span_gen_vs_null"], other["span_gen_best"], span["span_gen_best"]) == (-1, 1, 0)
    assert null["null_gen_vs_best"] == -1.0 and null["span"] == 0 and span["null"] == 0
    prior = np.exp([1.0, 0.9, 0.8]) / np.exp([1.0, 0.9, 0.8]).sum()
    assert (null["null_top_prior"], span["span_doc_prior"]) == pytest.approx((prior[0], prior[1]))
    agreeing = candidates(evidence, DOCS, None, gen("The bass is great"))
    assert [f["span_agrees"] for f in agreeing.features] == [1.0, 0.0, 0.0]
    assert candidates(evidence, DOCS, None, gen("I do not know.")).features[-1]["null_generated"]


def test_the_score_request_weighs_the_spans_over_their_documents_first() -> None:
    docs = [ReadDocument(id=f"d{i}", text=f"text {i}", score=1.0 - i / 10) for i in range(4)]
    spans = [Answer(answer=t, score=0.5, start=0, end=1, document_id=d) for t, d in
             (("x", "d3"), ("y", "d1"))]  # fmt: skip
    request = QueryRequest(question="q?")
    call = score_request(request, docs, ReadResponse(answers=spans, no_answer_score=0.1), 2)
    assert call is not None
    assert [d.id for d in call.documents] == ["d1", "d3"] and call.candidates == ["x", "y", ""]
    call = score_request(request, docs, ReadResponse(answers=spans, no_answer_score=0.1), 3)
    assert call is not None and [d.id for d in call.documents] == ["d0", "d1", "d3"]
    assert score_request(request, docs, ReadResponse(answers=[], no_answer_score=0.1), 3) is None


@pytest.mark.slow  # the app over the tiny engine, with the real packaged MiniLM retriever
def test_ensemble_mode_by_scoring_answers_grounded_through_the_app(
    api_server: Any, tmp_path: Path
) -> None:
    """generator_use: score, through HTTP and the in-process transport: no generation, the
    generator's scores reach the policy (it answers the generator's favourite span), and the
    answer carries its document and offsets, plainly and streamed."""
    import httpx

    from qaserve.pipeline import as_read_documents
    from qaserve_client.schema import QueryResponse
    from qaserve_client.sse import SSEDecoder

    pipeline = api_server.backend
    reviews = [
        {"id": "battery", "text": "The battery lasts about ten hours on a single charge."},
        {"id": "screen", "text": "The screen is bright and sharp, even outdoors."},
    ]
    body = {"question": "How long does the battery last?", "collection": "ens_score"}
    policy = hand_policy(tmp_path, span_gen=1.0, null=-100.0)
    saved = pipeline.ensemble
    pipeline.ensemble = Ensemble(EnsembleConfig(generator_use="score", policy=policy))
    headers = {"Authorization": f"Bearer {api_server.write_key}"}
    try:
        with httpx.Client(base_url=api_server.url, timeout=60, headers=headers) as http:
            ingest = {"collection": "ens_score", "documents": reviews}
            assert http.post("/v1/documents", json=ingest).status_code == 200
            plain = QueryResponse.model_validate(http.post("/v1/query", json=body).json())
            stream = http.post("/v1/query", json={**body, "stream": True})
    finally:
        pipeline.ensemble = saved
    events = [(e.event, json.loads(e.data)) for e in SSEDecoder().feed(stream.text)]
    assert [name for name, _ in events] == ["documents", "answers", "answer", "done"]
    assert QueryResponse.model_validate(events[-2][1]).answer == plain.answer

    assert plain.generated is None and "generator" in plain.timings_ms
    answer = plain.answer
    assert answer.source == "both" and answer.text and plain.answers
    doc = next(d for d in plain.documents if d.id == answer.document_id)
    assert answer.start is not None and doc.text[answer.start : answer.end] == answer.text
    read_back = ReadResponse(answers=plain.answers, no_answer_score=plain.no_answer_score)
    docs = as_read_documents(plain.documents)
    call = score_request(QueryRequest(**body), docs, read_back, saved.cfg.score_documents)
    assert call is not None
    scored = pipeline.calls.generator.score_request(call).scores
    assert answer.text == max(scored[:-1], key=lambda s: s.mean_logprob).text
