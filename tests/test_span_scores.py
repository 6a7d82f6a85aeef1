"""Generative scoring of the reader's spans: the batched, prefix-cached teacher forcing of
`RagTokenGenerator.score_spans` against a brute-force one (each candidate alone, each document
alone, the whole prompt + target through the model, summed in fp64), on tiny random models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_generator import DOCS, QUESTION, tiny_dirs  # noqa: F401  # tiny_dirs: a fixture

from qaserve.config import GeneratorConfig
from qaserve.deployments.generator import RagTokenGenerator
from qaserve.deployments.prior import NO_ANSWER_TEXT
from qaserve.deployments.rag_objective import rag_token_logprobs
from qaserve.deployments.span_scores import ScoreRequest
from qaserve.errors import BadRequest
from qaserve_client.schema import ReadDocument

# Different lengths (1 to many tokens), a repeat, and "no answer".
SPANS = ["twelve hours", "loud", "", "The screen is bright, the speakers are loud", "loud"]


@pytest.fixture(scope="module", params=["causal", "seq2seq"])
def gen(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]) -> RagTokenGenerator:  # noqa: F811
    return RagTokenGenerator(GeneratorConfig(model=str(tiny_dirs[request.param])), threads=1)


def brute_force(gen: RagTokenGenerator, docs: list[ReadDocument], span: str) -> list[float]:
    """Per-token marginal log-probs of one span: every document alone, no batch, no cache."""
    if all(d.score is not None for d in docs):
        prior = torch.softmax(torch.tensor([d.score for d in docs], dtype=torch.float64), 0)
    else:
        prior = torch.full((len(docs),), 1 / len(docs), dtype=torch.float64)
    target = gen.target_ids(span)
    per_doc = []
    with torch.no_grad():
        for ids in gen.encode(QUESTION, docs):
            if gen.kind == "causal":
                logits = gen.model(torch.tensor([ids + target])).logits[0, len(ids) - 1 : -1]
            else:
                start = gen.model.config.decoder_start_token_id
                logits = gen.model(
                    input_ids=torch.tensor([ids]),
                    decoder_input_ids=torch.tensor([[start, *target[:-1]]]),
                ).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            per_doc.append(logp[torch.arange(len(target)), torch.tensor(target)])
    joint = torch.stack(per_doc) + prior.log()[:, None]
    return torch.logsumexp(joint, 0).tolist()


def test_span_scores_equal_one_candidate_at_a_time(gen: RagTokenGenerator) -> None:
    scores = gen.score_spans(QUESTION, DOCS, SPANS)
    assert [s.text for s in scores] == SPANS
    for span, score in zip(SPANS, scores, strict=True):
        expected = brute_force(gen, DOCS, span)
        assert score.tokens == len(expected) == len(gen.target_ids(span))
        # fp32 batched + cached vs fp64 one at a time: ~1e-5; a wrong mask, position, cache
        # row or prior moves these random models' log-probs by far more than 1e-3
        assert score.token_logprobs == pytest.approx(expected, abs=1e-3)
        assert score.logprob == pytest.approx(sum(expected), abs=5e-3)
        assert score.mean_logprob == pytest.approx(sum(expected) / len(expected), abs=1e-3)
    assert scores[1].logprob == pytest.approx(scores[4].logprob, abs=1e-5)  # same span


def test_uniform_prior_and_one_document(gen: RagTokenGenerator) -> None:
    docs = [ReadDocument(id=d.id, text=d.text) for d in DOCS[:2]]
    (score,) = gen.score_spans(QUESTION, docs, ["twelve hours"])
    assert score.token_logprobs == pytest.approx(brute_force(gen, docs, "twelve hours"), abs=1e-3)
    (alone,) = gen.score_spans(QUESTION, DOCS[:1], ["loud"])
    assert alone.token_logprobs == pytest.approx(brute_force(gen, DOCS[:1], "loud"), abs=1e-3)


def test_no_answer_is_scored_as_the_no_answer_text(gen: RagTokenGenerator) -> None:
    empty, text = gen.score_spans(QUESTION, DOCS, ["", NO_ANSWER_TEXT])
    assert gen.target_ids("") == gen.target_ids(NO_ANSWER_TEXT)
    assert gen.target_ids("x")[-1] == gen.end_id and gen.end_id in gen.eos_token_ids
    assert empty.logprob == pytest.approx(text.logprob, abs=1e-5)


def test_score_request_and_bad_requests(gen: RagTokenGenerator) -> None:
    request = ScoreRequest(question=QUESTION, documents=DOCS, candidates=["loud", ""])
    response = gen.score_request(request)
    assert [s.text for s in response.scores] == ["loud", ""]
    assert sum(response.document_weights) == pytest.approx(1.0)
    assert all(s.logprob < 0 and math.isfinite(s.logprob) for s in response.scores)
    with pytest.raises(BadRequest):
        gen.score_spans(QUESTION, DOCS, [])
    with pytest.raises(BadRequest):
        gen.score_spans(" ", DOCS, ["loud"])
    with pytest.raises(ValueError):
        ScoreRequest(question=QUESTION, documents=DOCS, candidates=["a"] * 9)


def test_serving_scores_equal_the_training_objective(tiny_dirs: dict[str, Path]) -> None:  # noqa: F811
    """The prefix-cached scorer and rag_objective's one-pass batch (what train-generator
    optimises; causal LMs) give one likelihood: a model is served as it was trained."""
    gen = RagTokenGenerator(GeneratorConfig(model=str(tiny_dirs["causal"])), threads=1)
    targets = [gen.target_ids(s) for s in SPANS]
    with torch.inference_mode():
        trained = rag_token_logprobs(
            gen.model, gen.encode(QUESTION, DOCS), targets, gen.log_prior(DOCS), gen.pad_id
        )
    served = gen.score_spans(QUESTION, DOCS, SPANS)
    assert [s.logprob for s in served] == pytest.approx(trained.sequence_logprob.tolist(), abs=1e-4)
