"""Reader training: feature targets against gold text, and a 3-step run of a tiny random BERT."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest

from qaserve.offline.train_reader import (
    best_span,
    length_batches,
    make_features,
    register,
    train_reader,
    training_targets,
)
from qaserve.subjqa import load_subjqa

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from qaserve.config import packaged_embedder

    return AutoTokenizer.from_pretrained(packaged_embedder())


@pytest.fixture(scope="module")
def examples():
    return load_subjqa(FIXTURE)


def _tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    return BertForQuestionAnswering(cfg)


def _context_offsets(tokenizer, ex, max_length, stride):
    """Eval features carry offsets; train features of the same windows share their order."""
    return make_features([ex], tokenizer, max_length=max_length, stride=stride, train=False)


def test_targets_cover_the_gold_text(tokenizer, examples):
    found = 0
    for ex in examples:
        targets = training_targets(ex)
        windows = _context_offsets(tokenizer, ex, 384, 128)
        feats = make_features([ex], tokenizer)
        assert len(feats) == len(windows) * len(targets)
        for k, f in enumerate(feats):
            text, start = targets[k % len(targets)]
            offsets = windows[k // len(targets)].offsets
            if f.start == 0:
                assert f.end == 0
                continue
            found += 1
            assert 0 < f.start <= f.end
            # The token span covers exactly the answer's characters (up to token boundaries).
            assert offsets[f.start][0] <= start < offsets[f.start][1]
            assert offsets[f.end][0] < start + len(text) <= offsets[f.end][1]
    assert found == 6  # every non-empty answer fits one 384-token window somewhere


def test_token_span_decodes_to_answer(tokenizer, examples):
    ex = next(e for e in examples if e.id.startswith("26bb2fbf"))
    (f,) = make_features([ex], tokenizer)
    assert tokenizer.decode(f.input_ids[f.start : f.end + 1]) == "this keyboard is compact"


def test_unanswerable_maps_to_cls(tokenizer, examples):
    nulls = [e for e in examples if e.is_impossible]
    assert nulls
    for f in make_features(nulls, tokenizer):
        assert (f.start, f.end) == (0, 0)
    mixed = next(e for e in examples if e.id.startswith("991b7bc6"))
    assert training_targets(mixed) == [("It does so many things", 40)]


@pytest.mark.parametrize(("max_length", "stride"), [(384, 128), (128, 32)])
def test_long_review_windows_keep_or_drop_the_answer(tokenizer, examples, max_length, stride):
    ex = next(e for e in examples if e.id.startswith("8a49da85"))
    gold = ex.answers[0]
    windows = _context_offsets(tokenizer, ex, max_length, stride)
    feats = make_features([ex], tokenizer, max_length=max_length, stride=stride)
    assert len(windows) >= 2
    hits = 0
    for w, f in zip(windows, feats, strict=True):
        assert len(f.input_ids) <= max_length
        ctx = [o for o in w.offsets if o is not None]
        holds = ctx[0][0] <= gold.start and gold.end <= ctx[-1][1]
        if holds:
            hits += 1
            assert tokenizer.decode(f.input_ids[f.start : f.end + 1]) == gold.text.lower()
        else:
            assert (f.start, f.end) == (0, 0)
    assert hits >= 1
    assert any(f.start == 0 for f in feats)


def test_length_batches_cover_everything_and_are_seeded():
    lengths = [random.Random(1).randint(10, 384) for _ in range(1000)]
    a = length_batches(lengths, 16, random.Random(7))
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert a == length_batches(lengths, 16, random.Random(7))
    assert a != length_batches(lengths, 16, random.Random(8))
    # Bucketing: padding waste far below random batching.
    waste = sum(max(lengths[i] for i in b) * len(b) for b in a) / sum(lengths)
    assert waste < 1.1


def test_best_span_null_vs_span():
    offsets = [None, None, (0, 3), (4, 7), (8, 11), None]
    start = np.array([0.0, 0, 5, 0, 0, 0])
    end = np.array([0.0, 0, 0, 5, 0, 0])
    score, null, cs, ce = best_span(start, end, offsets)
    assert (cs, ce) == (0, 7) and score > null
    score, null, *_ = best_span(
        np.array([9.0, 0, 0, 0, 0, 0]), np.array([9.0, 0, 0, 0, 0, 0]), offsets
    )
    assert null > score
    # Longer than max_answer_len tokens: not a candidate.
    _, _, cs, ce = best_span(
        np.array([0.0, 0, 9, 0, 0, 0]), np.array([0.0, 0, 0, 0, 9, 0]), offsets, 2
    )
    assert ce - cs < 11


def _train(tokenizer, out: Path, seed: int = 3):
    return train_reader(
        [FIXTURE],
        [FIXTURE],
        out,
        epochs=1,
        batch_size=4,
        lr=1e-3,
        seed=seed,
        max_steps=3,
        threads=1,
        log_every=1,
        progress=False,
        model=_tiny_model(tokenizer),
        tokenizer=tokenizer,
    )


def test_three_step_run_saves_a_checkpoint(tokenizer, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    log = _train(tokenizer, tmp_path / "ckpt")
    assert log["steps"] == 3
    assert [x["step"] for x in log["losses"]] == [1, 2, 3]
    assert all(np.isfinite(x["loss"]) for x in log["losses"])
    assert log["evals"] and log["best"]["all"]["n"] == 11
    assert 0.0 <= log["best"]["all"]["f1"] <= 1.0
    saved = json.loads((tmp_path / "ckpt" / "train_log.json").read_text())
    assert saved["steps"] == 3
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    reloaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "ckpt")
    assert reloaded.config.hidden_size == 32


def test_same_seed_same_losses(tokenizer, tmp_path):
    a = [x["loss"] for x in _train(tokenizer, tmp_path / "a")["losses"]]
    b = [x["loss"] for x in _train(tokenizer, tmp_path / "b")["losses"]]
    c = [x["loss"] for x in _train(tokenizer, tmp_path / "c", seed=4)["losses"]]
    assert a == b
    assert a != c


def test_cli_registration(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        [
            "train-reader",
            "--train",
            str(FIXTURE),
            "--dev",
            str(FIXTURE),
            "--output",
            str(tmp_path),
            "--epochs",
            "3",
            "--lr",
            "5e-5",
        ]
    )
    assert args.cmd == "train-reader" and callable(args.func)
    assert args.train == [FIXTURE] and args.epochs == 3.0 and args.lr == 5e-5
