"""prune-reader: the cubic schedule, magnitude and movement masks, the structured FFN cut (an
exact function of the gated model, exported to int8 and read with), and resumption."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from qaserve.offline.prune_reader import (
    FFNCut,
    Magnitude,
    Movement,
    cubic_sparsity,
    encoder_linears,
    prune_reader,
    register,
    sparsity_report,
    top_mask,
)
from qaserve.offline.reader_loop import LoopConfig

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from qaserve.config import packaged_embedder

    return AutoTokenizer.from_pretrained(packaged_embedder())


def tiny_ckpt(tokenizer: Any, dest: Path, seed: int = 0) -> Path:
    from test_distill_reader import tiny_qa

    tiny_qa(tokenizer, layers=2, seed=seed).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def test_cubic_schedule() -> None:
    assert cubic_sparsity(0, 0.8, 10, 50) == 0.0
    assert cubic_sparsity(10, 0.8, 10, 50) == 0.0
    assert cubic_sparsity(30, 0.8, 10, 50) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(50, 0.8, 10, 50) == 0.8
    assert cubic_sparsity(90, 0.8, 10, 50) == 0.8
    levels = [cubic_sparsity(t, 0.8, 10, 50) for t in range(10, 51)]
    assert levels == sorted(levels)  # never decreasing
    steps = [b - a for a, b in itertools.pairwise(levels)]
    assert steps[0] > steps[-1]  # fast at first, slow near the end


def test_top_mask_keeps_the_largest_exactly() -> None:
    values = torch.tensor([[0.5, -3.0, 2.0], [0.1, 7.0, 1.0]])
    assert top_mask(values, 0.5).tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    assert top_mask(values.abs(), 0.5).tolist() == [[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]
    assert top_mask(values, 0.0).sum() == 6 and top_mask(values, 0.99).sum() == 0


def test_magnitude_hits_the_target_at_the_end_step(tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(tiny_ckpt(tokenizer, tmp_path / "m"))
    pruner = Magnitude(model, final=0.6, start=2, end=9, every=3)
    seen, before = [], {}
    for step in range(1, 13):
        if step == 9:
            before = {n: lin.weight.detach().abs().clone() for n, lin in pruner.linears.items()}
        pruner.after_step(model, step)
        seen.append(sparsity_report(model)["sparsity"])
    assert seen[:2] == [0.0, 0.0]
    assert 0.0 < seen[4] < seen[7] < 0.6  # step 5 (first due), step 8
    assert seen[8] == pytest.approx(0.6, abs=1e-3)  # step 9 = the end step, not a multiple
    assert seen[-1] == seen[8]
    for name, lin in encoder_linears(model).items():
        kept = lin.weight != 0
        assert int((~kept).sum()) == round(0.6 * kept.numel())
        assert before[name][kept].min() >= before[name][~kept].max()  # the largest |w| stay


def test_movement_masks_keep_the_top_scores(tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(tiny_ckpt(tokenizer, tmp_path / "m"))
    mov = Movement(model, final=0.75, start=0, end=4)
    layer = mov.layers[0]
    with torch.no_grad():
        layer.scores.copy_(torch.randn_like(layer.scores))
    mov.set_step(model, 4)
    mask = layer.mask()
    k = layer.scores.numel() - round(0.75 * layer.scores.numel())
    assert int(mask.sum()) == k
    assert layer.scores[mask.bool()].min() > layer.scores[~mask.bool()].max()
    x = torch.randn(3, layer.in_features)
    expect = torch.nn.functional.linear(x, layer.weight * mask, layer.bias)
    torch.testing.assert_close(layer(x), expect)
    # Straight-through: dL/dscores = dL/d(W*M) * W, also for the weights masked away.
    layer(x).sum().backward()
    grad_eff = torch.ones(3, layer.out_features).T @ x
    torch.testing.assert_close(layer.scores.grad, grad_eff * layer.weight)


def test_movement_run_saves_zeros_where_the_mask_was(tokenizer: Any, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForQuestionAnswering

    # lr 1e-2: every evaluation ties on F1 here, so choosing an early one shows at once
    cfg = LoopConfig(epochs=2, batch_size=4, lr=1e-2, seed=1, eval_every=1)
    ckpt = tiny_ckpt(tokenizer, tmp_path / "m")
    log = prune_reader(
        [FIXTURE],
        [FIXTURE],
        tmp_path / "run",
        cfg,
        model_from=str(ckpt),
        method="movement",
        sparsity=0.5,
        prune_start=0.0,
        prune_end=1.0,
        threads=1,
        progress=False,
    )
    # Only the last step reaches the target sparsity: it is the only one that may be chosen.
    assert [e["selectable"] for e in log["evals"]] == [False] * 7 + [True]
    assert log["best"]["step"] == 8 and log["best"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    saved = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "run" / "best")
    assert sparsity_report(saved)["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert log["final"]["zlib_bytes"] < log["final"]["safetensors_bytes"]
    with safe_open(str(tmp_path / "run" / "best" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith(".scores")]  # noqa: SIM118


def _gated(model: Any, plans: list[list[int]]) -> list[Any]:
    """Zero the FFN neurons not in each plan, with forward hooks (the uncut reference)."""
    handles = []
    for layer, keep in zip(model.bert.encoder.layer, plans, strict=True):
        gate = torch.zeros(layer.intermediate.dense.out_features)
        gate[keep] = 1.0
        handles.append(layer.intermediate.register_forward_hook(lambda m, i, o, g=gate: o * g))
    return handles


def test_ffn_cut_is_the_gated_model_and_exports(tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForQuestionAnswering

    from qaserve.config import ReaderConfig
    from qaserve.deployments.onnx_export import write_reader_folder
    from qaserve.deployments.reader import Reader

    ckpt = tiny_ckpt(tokenizer, tmp_path / "m")
    model = AutoModelForQuestionAnswering.from_pretrained(ckpt).eval()
    reference = AutoModelForQuestionAnswering.from_pretrained(ckpt).eval()
    with torch.no_grad():  # neurons 0..15 of layer 0 are dead: they must be the ones cut
        model.bert.encoder.layer[0].output.dense.weight[:, :16] = 0.0
        reference.bert.encoder.layer[0].output.dense.weight[:, :16] = 0.0
    cut = FFNCut(model, fraction=0.25, at=0)
    enc = tokenizer(
        ["is it good?"], ["the battery is good and the screen is bright."], return_tensors="pt"
    )
    model.train()
    out = model(**enc)
    (out.start_logits.logsumexp(-1) + out.end_logits.logsumexp(-1)).sum().backward()
    assert cut.before_step(model, 0) is True and cut.before_step(model, 1) is False
    assert cut.plan is not None and not set(range(16)) & set(cut.plan[0])
    assert model.bert.encoder.layer[1].intermediate.dense.weight.shape == (48, 32)
    handles = _gated(reference, cut.plan)
    model.eval()
    with torch.no_grad():
        got, want = model(**enc), reference(**enc)
    torch.testing.assert_close(got.start_logits, want.start_logits, rtol=1e-5, atol=1e-5)
    for h in handles:
        h.remove()
    model.save_pretrained(tmp_path / "cut")
    tokenizer.save_pretrained(tmp_path / "cut")
    reloaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "cut")
    assert reloaded.config.intermediate_size == 48
    folder = write_reader_folder(
        tmp_path / "cut", tmp_path / "int8", "int8", cache_dir=tmp_path / "c"
    )
    reader = Reader(ReaderConfig(model=str(folder), precision="int8"), tmp_path / "c", threads=1)
    res = reader.read("Is the battery good?", ["The battery lasts all day and charges fast."])
    assert (
        res.answers and json.loads((folder / "config.json").read_text())["intermediate_size"] == 48
    )


def _structured(tokenizer: Any, tmp_path: Path, ckpt: Path, **kw: Any) -> dict[str, Any]:
    cfg = LoopConfig(epochs=2, batch_size=4, lr=1e-3, seed=2, save_every=1)
    return prune_reader(
        [FIXTURE],
        [FIXTURE],
        tmp_path / "run",
        cfg,
        model_from=str(ckpt),
        method="magnitude",
        sparsity=0.3,
        prune_start=0.0,
        prune_end=0.5,
        prune_every=1,
        structured="ffn",
        fraction=0.5,
        cut_at=0.25,
        threads=1,
        progress=False,
        log_every=1,
        **kw,
    )


def test_resumed_pruning_equals_an_uninterrupted_run(tokenizer: Any, tmp_path: Path) -> None:
    ckpt = tiny_ckpt(tokenizer, tmp_path / "m")
    whole = _structured(tokenizer, tmp_path / "a", ckpt)
    _structured(tokenizer, tmp_path / "b", ckpt, stop_after=5)  # after the cut (step 2)
    rest = _structured(tokenizer, tmp_path / "b", ckpt)
    assert rest["resumed_at"] == [5] and rest["steps"] == whole["steps"] == 8
    assert [x["loss"] for x in rest["losses"]] == pytest.approx(
        [x["loss"] for x in whole["losses"]], rel=1e-5
    )
    assert rest["final"]["intermediate_size"] == 32
    assert rest["final"]["sparsity"] == whole["final"]["sparsity"] == pytest.approx(0.3, abs=1e-3)


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to do"):
        prune_reader([FIXTURE], [], tmp_path, LoopConfig(), method=None)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        [
            "prune-reader",
            "--train",
            str(FIXTURE),
            "--output",
            str(tmp_path),
            "--method",
            "movement",
            "--sparsity",
            "0.9",
            "--structured",
            "ffn",
            "--fraction",
            "0.5",
        ]
    )
    assert (args.method, args.sparsity, args.structured, args.alpha) == (
        "movement",
        0.9,
        "ffn",
        1.0,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["prune-reader", "--train", "x", "--output", "y", "--structured", "heads"]
        )
