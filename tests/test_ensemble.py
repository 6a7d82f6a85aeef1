import math

from qaserve.config import EnsembleConfig
from qaserve.deployments.ensemble import Ensemble, generator_confidence
from qaserve_client.schema import Answer, GeneratedToken, GenerateResponse, ReadResponse


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
