"""distill-reader: the loss against a hand computation, teacher logits cached once, the student
cut from the teacher's layers, a few steps lowering the loss, resumption, ONNX export."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qaserve.offline.distill_reader import (
    batch_loss,
    distill_loss,
    distill_reader,
    ensemble_logits,
    keep_layers,
    load_student,
    prepare_data,
    register,
    teacher_logits,
    training_windows,
)
from qaserve.offline.reader_loop import LoopConfig
from qaserve.offline.train_reader import collate

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from qaserve.config import packaged_embedder

    return AutoTokenizer.from_pretrained(packaged_embedder())


def tiny_qa(tokenizer: Any, layers: int = 4, seed: int = 0, intermediate: int = 64) -> Any:
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=512,
    )
    model = BertForQuestionAnswering(cfg)
    with torch.no_grad():
        model.qa_outputs.weight.normal_(0.0, 1.0)  # peaked start/end distributions
    return model


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    dest = tmp_path_factory.mktemp("teacher")
    tiny_qa(tokenizer).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def teacher_onnx(tmp_path_factory: pytest.TempPathFactory, teacher_ckpt: Path) -> Path:
    from qaserve.deployments.onnx_export import write_reader_folder

    root = tmp_path_factory.mktemp("teacher-onnx")
    return write_reader_folder(teacher_ckpt, root / "reader", "fp32", cache_dir=root / "cache")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_loss_matches_a_hand_computation() -> None:
    s = np.array([[1.0, 2.0, 0.5, 3.0, 9.0], [0.2, -1.0, 1.5, 0.0, 0.0]])
    t = np.array([[2.0, 0.0, 1.0, 1.0, -5.0], [1.0, 1.0, 0.0, 2.0, 7.0]])
    e = s[:, ::-1].copy()
    u = t[:, ::-1].copy()
    mask = np.array([[1, 0, 1, 1, 0], [1, 1, 1, 1, 0]], bool)  # 0 = question/pad: not scored
    gold_s, gold_e = np.array([2, 0]), np.array([3, 1])
    alpha, temp = 0.3, 2.0

    def hand(student: np.ndarray, teacher: np.ndarray, gold: np.ndarray) -> float:
        ce = kl = 0.0
        for r in range(2):
            m = mask[r]
            ps = _softmax(student[r][m])
            ce -= math.log(ps[int(np.flatnonzero(m).tolist().index(gold[r]))])
            pt_t, ps_t = _softmax(teacher[r][m] / temp), _softmax(student[r][m] / temp)
            kl += float(np.sum(pt_t * np.log(pt_t / ps_t)))
        return alpha * ce / 2 + (1 - alpha) * temp**2 * kl / 2

    expect = (hand(s, t, gold_s) + hand(e, u, gold_e)) / 2
    T = torch.tensor
    got = distill_loss(
        (T(s), T(e)), (T(t), T(u)), T(mask), (T(gold_s), T(gold_e)), alpha, temp
    ).item()
    assert got == pytest.approx(expect, rel=1e-6)
    # alpha = 1: plain cross-entropy over the scored tokens, whatever the teacher says.
    ce = distill_loss((T(s), T(e)), (T(t), T(u)), T(mask), (T(gold_s), T(gold_e)), 1.0, temp)
    ce_hand = (
        sum(
            -math.log(_softmax(x[r][mask[r]])[np.flatnonzero(mask[r]).tolist().index(g[r])])
            for x, g in ((s, gold_s), (e, gold_e))
            for r in range(2)
        )
        / 4
    )
    assert ce.item() == pytest.approx(ce_hand, rel=1e-6)
    # A student equal to the teacher has zero KL: the loss is alpha * CE.
    same = distill_loss((T(t), T(u)), (T(t), T(u)), T(mask), (T(gold_s), T(gold_e)), 0.0, temp)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_student_keeps_the_chosen_teacher_layers(teacher_ckpt: Path) -> None:
    from transformers import AutoModelForQuestionAnswering

    teacher = AutoModelForQuestionAnswering.from_pretrained(teacher_ckpt)
    student, _ = load_student(str(teacher_ckpt), [0, 3], seed=1)
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for s_idx, t_idx in ((0, 0), (1, 3)):
        for name in ("attention.self.query.weight", "output.dense.weight"):
            got = s_sd[f"bert.encoder.layer.{s_idx}.{name}"]
            assert torch.equal(got, t_sd[f"bert.encoder.layer.{t_idx}.{name}"])
    assert not torch.equal(
        s_sd["bert.encoder.layer.1.output.dense.weight"],
        t_sd["bert.encoder.layer.1.output.dense.weight"],
    )
    assert torch.equal(s_sd["qa_outputs.weight"], t_sd["qa_outputs.weight"])
    with pytest.raises(ValueError, match="distinct"):
        keep_layers(teacher, [0, 0])


def test_onnx_teacher_logits_are_cached_and_reused(
    teacher_onnx: Path, tokenizer: Any, tmp_path: Path
) -> None:
    import onnxruntime as ort

    cfg = LoopConfig()
    train_feats, *_ = prepare_data([FIXTURE], [], tokenizer, cfg)
    windows = training_windows(train_feats)
    first, stats = teacher_logits(teacher_onnx, windows, tmp_path, batch=4)
    assert stats["computed"] == len(windows) and stats["cached"] == 0
    again, stats2 = teacher_logits(teacher_onnx, windows, tmp_path, batch=4)
    assert stats2["computed"] == 0 and stats2["cached"] == len(windows)
    # Batched and padded logits equal the teacher run on each window alone.
    session = ort.InferenceSession(str(teacher_onnx / "model.onnx"))
    for key in list(windows)[:3]:
        ids, types = windows[key]
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "token_type_ids": np.array([types], np.int64),
        }
        start, end = session.run(["start_logits", "end_logits"], feeds)
        np.testing.assert_allclose(again[key][0], start[0], atol=1e-4)
        np.testing.assert_allclose(first[key][1], end[0], atol=1e-4)
    # An ensemble of the same teacher twice is that teacher.
    mean, _ = ensemble_logits([teacher_onnx, teacher_onnx], windows, tokenizer, tmp_path)
    np.testing.assert_allclose(mean[key][0], first[key][0], rtol=1e-6)


def test_distillation_steps_lower_the_loss(
    teacher_onnx: Path, tokenizer: Any, tmp_path: Path
) -> None:
    cfg = LoopConfig(batch_size=8, lr=3e-3)
    feats, _, _, masks = prepare_data([FIXTURE], [], tokenizer, cfg)
    logits, _ = teacher_logits(teacher_onnx, training_windows(feats), tmp_path)
    student = tiny_qa(tokenizer, layers=2, seed=5)
    student.train()
    loss_fn = batch_loss(masks, logits, alpha=0.2, temperature=2.0)
    batch = collate(feats[:8])
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = loss_fn(student, feats[:8], batch)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.7 * losses[0]


def _distill(
    tokenizer: Any, teacher_onnx: Path, out: Path, cache: Path, **kw: Any
) -> dict[str, Any]:
    cfg = LoopConfig(epochs=2, batch_size=4, lr=1e-3, seed=3, save_every=1)
    return distill_reader(
        [FIXTURE],
        [FIXTURE],
        out,
        [str(teacher_onnx)],
        cfg,
        student_from=kw.pop("student_from"),
        student_layers=[1, 3],
        alpha=0.5,
        temperature=2.0,
        cache_dir=cache,
        threads=1,
        progress=False,
        log_every=1,
        **kw,
    )


def test_resumed_run_equals_an_uninterrupted_one(
    teacher_onnx: Path, teacher_ckpt: Path, tokenizer: Any, tmp_path: Path
) -> None:
    from transformers import AutoModelForQuestionAnswering

    whole = _distill(
        tokenizer, teacher_onnx, tmp_path / "a", tmp_path, student_from=str(teacher_ckpt)
    )
    part = _distill(
        tokenizer,
        teacher_onnx,
        tmp_path / "b",
        tmp_path,
        student_from=str(teacher_ckpt),
        stop_after=3,
    )
    assert part["steps"] == 3
    rest = _distill(
        tokenizer, teacher_onnx, tmp_path / "b", tmp_path, student_from=str(teacher_ckpt)
    )
    assert rest["resumed_at"] == [3] and rest["steps"] == whole["steps"] == 8
    assert [x["loss"] for x in rest["losses"]] == pytest.approx(
        [x["loss"] for x in whole["losses"]], rel=1e-5
    )
    a = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "a" / "best")
    assert a.config.num_hidden_layers == 2
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert log["teacher_logits"][0]["cached"] > 0  # the second and third runs reused the cache
    with pytest.raises(ValueError, match="other settings"):
        distill_reader(
            [FIXTURE],
            [FIXTURE],
            tmp_path / "b",
            [str(teacher_onnx)],
            LoopConfig(epochs=2, batch_size=4, lr=1e-3, seed=3, save_every=1),
            student_from=str(teacher_ckpt),
            student_layers=[1, 3],
            alpha=0.9,
            cache_dir=tmp_path,
            threads=1,
            progress=False,
        )


def test_three_layer_student_exports_and_reads(
    teacher_onnx: Path, teacher_ckpt: Path, tokenizer: Any, tmp_path: Path
) -> None:
    from qaserve.config import ReaderConfig
    from qaserve.deployments.onnx_export import write_reader_folder
    from qaserve.deployments.reader import Reader

    cfg = LoopConfig(epochs=1, batch_size=8, lr=1e-3, max_steps=1)
    distill_reader(
        [FIXTURE],
        [FIXTURE],
        tmp_path / "run",
        [str(teacher_onnx)],
        cfg,
        student_from=str(teacher_ckpt),
        student_layers=[0, 1, 3],
        cache_dir=tmp_path,
        threads=1,
        progress=False,
    )
    folder = write_reader_folder(
        tmp_path / "run" / "best", tmp_path / "int8", "int8", cache_dir=tmp_path / "c"
    )
    meta = json.loads((folder / "export.json").read_text())
    assert meta["variant"] == "int8"
    reader = Reader(ReaderConfig(model=str(folder), precision="int8"), tmp_path / "c", threads=1)
    res = reader.read(
        "Is the battery good?", ["The battery lasts all day and charges fast."], top_k=2
    )
    assert res.answers and res.no_answer_score is not None
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 3


def test_cli_registration(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        [
            "distill-reader",
            "--train",
            str(FIXTURE),
            "--output",
            str(tmp_path),
            "--teacher",
            "a",
            "--teacher",
            "b",
            "--student-layers",
            "0,2,4",
            "--alpha",
            "0.7",
        ]
    )
    assert args.teacher == ["a", "b"] and args.student_layers == [0, 2, 4] and args.alpha == 0.7
