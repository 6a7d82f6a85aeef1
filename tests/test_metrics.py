import pytest

from qaserve.metrics import (
    average_precision,
    exact_match,
    f1_score,
    normalize_answer,
    recall_at_k,
    squad_em_f1,
)


def test_normalize_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Sound, is GREAT!  ") == "sound is great"
    assert normalize_answer("an apple a day") == "apple day"


def test_exact_match_and_f1_on_hand_made_cases():
    assert exact_match("The battery.", "battery") == 1.0
    assert exact_match("battery life", "battery") == 0.0
    # pred: {great, sound} vs gold: {sound, quality, is, great}: p=1, r=0.5
    assert f1_score("great sound", "the sound quality is great") == pytest.approx(2 / 3)
    assert f1_score("terrible", "great sound") == 0.0


def test_empty_means_no_answer():
    assert squad_em_f1("", [""]) == (1.0, 1.0)
    assert squad_em_f1("", ["the bass"]) == (0.0, 0.0)
    assert squad_em_f1("bass", [""]) == (0.0, 0.0)
    # An empty gold among real ones is dropped, as in the official SQuAD 2.0 script.
    assert squad_em_f1("", ["", "the bass"]) == (0.0, 0.0)
    assert squad_em_f1("bass", ["", "the bass"]) == (1.0, 1.0)


def test_best_over_gold_answers():
    em, f1 = squad_em_f1("sound is crisp", ["muddy", "crisp sound", "sound is crisp and clear"])
    assert em == 0.0
    assert f1 == pytest.approx(0.8)  # vs "crisp sound": p=2/3, r=1 -> 0.8; vs the long one: 0.75


def test_recall_at_k():
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, {"c"}, 2) == 0.0
    assert recall_at_k(ranked, {"c"}, 3) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(ranked, set(), 3)


def test_average_precision():
    assert average_precision(["a", "b", "c"], {"a"}) == 1.0
    assert average_precision(["x", "a"], {"a"}) == 0.5
    # relevant at ranks 1 and 3 of 2 relevant: (1/1 + 2/3) / 2
    assert average_precision(["a", "x", "b"], {"a", "b"}) == pytest.approx((1 + 2 / 3) / 2)
    # one relevant never retrieved counts as a miss
    assert average_precision(["a"], {"a", "z"}) == 0.5
