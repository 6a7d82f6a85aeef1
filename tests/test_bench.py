"""`qaserve bench reader` end to end on a tiny random QA model and the SubjQA fixture: the
model written as the shipped folder is (int8 ONNX + fp16 weights/), a pruned second reader."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_reader import _save, random_model
from transformers import AutoTokenizer

from qaserve.cli import main
from qaserve.config import DEFAULT_READER_DIR, ReaderConfig, packaged_embedder
from qaserve.deployments.onnx_export import (
    WEIGHTS_DIR,
    checkpoint_hash,
    export_reader,
    read_export_meta,
    save_fp16_weights,
    write_reader_folder,
)
from qaserve.deployments.reader import Reader
from qaserve.errors import ConfigError
from qaserve.offline.bench import VARIANTS, TorchReader, build_readers, locate_models
from qaserve.offline.bench_variants import default_calibration, parse_reader_specs, shipped_others
from qaserve.offline.prune_reader import encoder_linears, top_mask
from qaserve.subjqa import load_subjqa
from qaserve_client.schema import ReadDocument

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(packaged_embedder())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return _save(random_model(tokenizer), tokenizer, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory, ckpt: Path, cache: Path) -> Path:
    """The tiny checkpoint written as serve/assets/reader is: int8 ONNX + fp16 weights/."""
    dest = tmp_path_factory.mktemp("shipped") / "reader"
    return write_reader_folder(ckpt, dest, "int8", cache_dir=cache, weights=True)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A second reader with half of each encoder linear's weights zeroed (by magnitude)."""
    model = random_model(tokenizer)
    with torch.no_grad():
        for lin in encoder_linears(model).values():
            lin.weight.mul_(top_mask(lin.weight.abs(), 0.5))
    return _save(model, tokenizer, tmp_path_factory.mktemp("pruned"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shipped: Path, pruned: Path) -> dict[str, Any]:
    """The CLI once in its short mode (--limit), on the shipped-style folder alone, with a
    fresh export cache (a fresh clone): its stdout, JSON and output folder."""
    out = tmp_path_factory.mktemp("bench")
    fresh = tmp_path_factory.mktemp("fresh-cache")
    argv = ["bench", "reader", "--model", str(shipped), "--data", str(FIXTURE)]
    argv += ["--reader", f"pruned={pruned}", "--calibration", str(FIXTURE), "--limit", "9"]
    argv += ["--threads", "1", "--output", str(out), "--cache-dir", str(fresh)]
    argv += ["--batch-sizes", "4,8", "--quiet"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    return {
        "rc": rc,
        "stdout": stdout.getvalue(),
        "out": out,
        "report": json.loads((out / "reader.json").read_text()),
        "predictions": json.loads((out / "reader-predictions.json").read_text()),
    }


# The other shipped readers (as served), then the --reader checkpoint's two exports.
EXTRA = [f"{name}/onnx-int8" for name in shipped_others()] + [
    "pruned/onnx-fp32",
    "pruned/onnx-int8",
]


def test_cli_writes_json_and_png_for_every_variant(run: dict[str, Any], shipped: Path) -> None:
    report, out = run["report"], run["out"]
    assert run["rc"] == 0
    assert (out / "reader.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every variant has a row, or (bf16, where ONNX Runtime's CPU provider has no bf16
    # MatMul) a reason; the pruned reader's exports follow.
    rows, skipped = report["variants"], report["skipped"]
    assert [v for v in VARIANTS if v not in skipped] + EXTRA == list(rows)
    assert set(skipped) <= {"onnx-bf16"}
    for name, reason in skipped.items():
        assert "MatMul" in reason and f"{name}: not run: {reason}" in run["stdout"]
    assert report["questions"] == 9 and report["warmup"] == 2  # --limit: the short mode
    assert report["baseline"] == "torch" and report["served"] == "onnx-int8"
    assert report["checkpoint"] == str(shipped / WEIGHTS_DIR)
    # Calibration took every fixture question (fewer windows than the default 160).
    assert report["calibration"]["questions"] == 11 < report["calibration"]["windows"]
    assert "pipeline" in report["note"]
    for key in ("cpu_model", "cpu_count", "threads", "date", "git_commit", "torch"):
        assert key in report["machine"]
    assert report["machine"]["threads"] == 1
    for name, row in rows.items():
        assert 0.0 <= row["em"] <= row["f1"] <= 1.0, name
        assert 0.0 <= row["lenient_em"] <= row["lenient_f1"] <= 1.0, name
        lat = row["latency_ms"]
        assert 0 < lat["median"] <= lat["p95"] < float("inf"), name
        assert set(row["throughput_qps"]) == {"4", "8"} and min(row["throughput_qps"].values()) > 0
        for ratios in (row["ratios"], row["vs_served"]):
            assert all(np.isfinite(v) for v in ratios.values()), name
        assert len(run["predictions"][name]) == 9
    # torch runs in fp32: twice the bytes of the fp16 weights it is stored as.
    stored = (shipped / WEIGHTS_DIR / "model.safetensors").stat().st_size / 2**20
    assert rows["torch"]["stored_mb"] == pytest.approx(stored, abs=0.01)
    assert rows["torch"]["size_mb"] == pytest.approx(2 * stored, rel=0.01)
    # The served row is the shipped model.onnx itself.
    assert Path(rows["onnx-int8"]["path"]) == shipped
    assert rows["onnx-int8"]["size_mb"] == pytest.approx(
        (shipped / "model.onnx").stat().st_size / 2**20, abs=0.01
    )
    assert rows["onnx-int8-static"]["format"] == "onnx-int8-static"
    info = report["readers"]["pruned"]
    assert info["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert info["zlib_mb"] < info["safetensors_mb"]
    # The table names every variant; each of the four targets gets a verdict.
    for name in rows:
        assert name in run["stdout"]
    assert "sparsity 50.0%" in run["stdout"]
    verdicts = [ln for ln in run["stdout"].splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == len(report["targets"]) == 4


def test_ratios_follow_from_the_json(run: dict[str, Any]) -> None:
    rows = run["report"]["variants"]
    base = rows["torch"]
    for row in rows.values():
        r = row["ratios"]
        med = base["latency_ms"]["median"] / row["latency_ms"]["median"]
        assert r["speedup_median"] == pytest.approx(med, rel=2e-3, abs=1e-3)
        assert r["size_ratio"] == pytest.approx(
            base["size_mb"] / row["size_mb"], rel=2e-3, abs=1e-3
        )
        assert r["em_delta_points"] == pytest.approx(100 * (row["em"] - base["em"]), abs=0.01)
        assert r["f1_delta_points"] == pytest.approx(100 * (row["f1"] - base["f1"]), abs=0.01)
        for k, qps in row["throughput_qps"].items():
            want = qps / base["throughput_qps"][k]
            assert r[f"throughput_ratio_{k}"] == pytest.approx(want, rel=2e-3, abs=1e-3)
        served, v = rows["onnx-int8"], row["vs_served"]
        med = served["latency_ms"]["median"] / row["latency_ms"]["median"]
        assert v["speedup_median"] == pytest.approx(med, rel=2e-3, abs=1e-3)
        assert v["f1_delta_points"] == pytest.approx(100 * (row["f1"] - served["f1"]), abs=0.01)
    assert rows["torch"]["ratios"]["speedup_median"] == 1.0
    assert rows["onnx-int8"]["vs_served"]["speedup_median"] == 1.0
    # int8 weights are a quarter of fp32's; the tiny model's embeddings keep it above that.
    assert rows["onnx-int8"]["ratios"]["size_ratio"] > 1.5
    int8 = rows["onnx-int8"]["ratios"]
    want = [
        int8["speedup_median"] >= 2.0,
        int8["size_ratio"] >= 3.5,
        abs(int8["em_delta_points"]) <= 1.0,
        abs(int8["f1_delta_points"]) <= 1.0,
    ]
    assert [t["pass"] for t in run["report"]["targets"]] == want
    assert run["report"]["targets"][0]["value"] == int8["speedup_median"]


def test_torch_and_onnx_fp32_agree(ckpt: Path, cache: Path, run: dict[str, Any]) -> None:
    """Same tokenisation and decoding, so only the runtime differs: same logits and answers."""
    preds = run["predictions"]
    assert preds["torch"] == preds["onnx-fp32"]
    torch_reader = TorchReader(ckpt, threads=1)
    onnx_reader = Reader(
        ReaderConfig(model=str(export_reader(str(ckpt), cache, "fp32"))), cache, threads=1
    )
    for ex in load_subjqa(FIXTURE):
        enc = onnx_reader.tokenizer.encode(ex.question, ex.context)
        feeds = {
            "input_ids": np.array([enc.ids], np.int64),
            "attention_mask": np.array([enc.attention_mask], np.int64),
            "token_type_ids": np.array([enc.type_ids], np.int64),
        }
        names = ["start_logits", "end_logits"]
        a = torch_reader.session.run(names, {k: feeds[k] for k in torch_reader.input_names})
        b = onnx_reader.session.run(names, {k: feeds[k] for k in onnx_reader.input_names})
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)
        docs = [ReadDocument(id=ex.review_id, text=ex.context)]
        ra = torch_reader.read(ex.question, docs, top_k=3, handle_impossible_answer=True)
        rb = onnx_reader.read(ex.question, docs, top_k=3, handle_impossible_answer=True)
        assert [(x.answer, x.start, x.end) for x in ra.answers] == [
            (x.answer, x.start, x.end) for x in rb.answers
        ]
        np.testing.assert_allclose(
            [x.score for x in ra.answers], [x.score for x in rb.answers], rtol=1e-3
        )


def test_exported_folder_finds_its_checkpoint(ckpt: Path, cache: Path, tmp_path: Path) -> None:
    folder = write_reader_folder(ckpt, tmp_path / "reader", "int8", cache_dir=cache)
    models = locate_models(folder, cache)
    assert models.checkpoint is not None and models.checkpoint.resolve() == ckpt.resolve()
    assert models.exported["onnx-int8"] == folder
    assert models.folder("onnx-fp32", cache).parent.parent == cache / "reader"


def test_exported_folder_without_its_checkpoint(
    ckpt: Path, cache: Path, tmp_path: Path, tokenizer: Any
) -> None:
    # A checkpoint that is then changed: its export must not be benchmarked against it.
    changed = shutil.copytree(ckpt, tmp_path / "changed")
    folder = write_reader_folder(changed, tmp_path / "reader", "int8", cache_dir=tmp_path / "c1")
    (changed / "config.json").write_text(
        (changed / "config.json").read_text().replace("{", '{"note": "retrained",', 1)
    )
    (folder / "README.md").write_text(
        "# reader\n\n```\nqaserve train-reader --train data/x.csv --output runs/ck\n```\n"
    )
    empty = tmp_path / "empty-cache"
    models = locate_models(folder, empty)
    assert models.checkpoint is None
    with pytest.raises(ConfigError, match=re.escape("train-reader --train data/x.csv")):
        build_readers(models, ["torch"], empty, threads=1)
    with pytest.raises(ConfigError, match="--model"):
        build_readers(models, ["onnx-fp32"], empty, threads=1)
    readers = build_readers(models, ["onnx-int8"], empty, threads=1)
    assert readers["onnx-int8"].folder == folder


def test_shipped_folder_carries_fp16_weights(shipped: Path, ckpt: Path, tmp_path: Path) -> None:
    """A copy of the shipped folder alone (a fresh clone) finds its torch baseline in
    weights/, stored fp16, loaded fp32, answering as the fp32 checkpoint does."""
    clone = shutil.copytree(shipped, tmp_path / "clone" / "reader")
    meta = read_export_meta(clone)
    assert meta["source"] == WEIGHTS_DIR and meta["weights_dtype"] == "float16"
    assert meta["hash"] == checkpoint_hash(clone / WEIGHTS_DIR)
    weights = load_file(clone / WEIGHTS_DIR / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    models = locate_models(clone, tmp_path / "empty-cache")
    assert models.checkpoint == clone / WEIGHTS_DIR
    assert models.exported == {"onnx-int8": clone}
    half = TorchReader(clone / WEIGHTS_DIR, threads=1)
    full = TorchReader(ckpt, threads=1)
    assert next(half.session.model.parameters()).dtype == torch.float32
    assert half.fp32_bytes == full.fp32_bytes
    for ex in load_subjqa(FIXTURE):
        docs = [ReadDocument(id=ex.review_id, text=ex.context)]
        a = half.read(ex.question, docs, top_k=1, handle_impossible_answer=True)
        b = full.read(ex.question, docs, top_k=1, handle_impossible_answer=True)
        assert a.answers[0].answer == b.answers[0].answer
        assert a.answers[0].score == pytest.approx(b.answers[0].score, rel=0.02, abs=1e-4)


def test_fp16_weights_refuse_what_fp16_cannot_hold(tmp_path: Path, tokenizer: Any) -> None:
    model = random_model(tokenizer)
    with torch.no_grad():
        model.qa_outputs.weight[0, 0] = 1e5  # fp16's largest is 65504
    ckpt = _save(model, tokenizer, tmp_path / "big")
    with pytest.raises(ValueError, match=r"qa_outputs\.weight exceeds the fp16 range"):
        save_fp16_weights(ckpt, tmp_path / "weights")


def test_default_model_is_the_shipped_reader(tmp_path: Path) -> None:
    """No --model: the reader folder the package ships (what `qaserve serve` runs)."""
    out = tmp_path / "out"
    argv = ["bench", "reader", "--data", str(FIXTURE), "--variants", "onnx-int8"]
    argv += ["--limit", "2", "--batch-sizes", "2", "--threads", "1", "--quiet"]
    argv += ["--output", str(out), "--cache-dir", str(tmp_path / "cache")]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    report = json.loads((out / "reader.json").read_text())
    assert report["model"] == str(DEFAULT_READER_DIR)
    assert Path(report["variants"]["onnx-int8"]["path"]) == DEFAULT_READER_DIR


def test_reader_specs() -> None:
    assert parse_reader_specs(["s3=runs/s/best", " p = x "]) == {
        "s3": Path("runs/s/best"),
        "p": Path("x"),
    }
    for bad in (["runs/s/best"], ["=x"], ["a="], ["a/b=x"], ["a=x", "a=y"]):
        with pytest.raises(ConfigError, match="--reader"):
            parse_reader_specs(bad)


def test_default_calibration_is_the_train_split_beside_the_data(tmp_path: Path) -> None:
    for layout in (tmp_path / "ours" / "electronics", tmp_path / "public" / "electronics"):
        folder = layout / "splits" if "public" in str(layout) else layout
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            shutil.copy(FIXTURE, folder / f"{split}.csv")
        assert default_calibration(folder / "test.csv") == folder / "train.csv"
        assert default_calibration(layout) == layout  # its train split is read
    with pytest.raises(ConfigError, match="--calibration"):
        default_calibration(FIXTURE)  # no train.csv beside it


def test_every_variant_decides_at_weight_one(shipped: Path, tmp_path: Path) -> None:
    """A shipped model's calibration.json must not tilt the table: the bench compares
    runtimes and models at the pipeline's no-answer rule, the served reader included."""
    from qaserve.deployments.reader import CALIBRATION_NAME
    from qaserve.offline.bench_variants import onnx_reader

    clone = shutil.copytree(shipped, tmp_path / "calibrated" / "reader")
    (clone / CALIBRATION_NAME).write_text(json.dumps({"null_weight": 1e9}))
    assert onnx_reader(clone, tmp_path / "cache", 1).null_weight == 1.0
    assert TorchReader(clone / WEIGHTS_DIR, threads=1).null_weight == 1.0
    ex = load_subjqa(FIXTURE)[0]
    served = Reader(ReaderConfig(model=str(clone)), tmp_path / "cache", threads=1)
    benched = onnx_reader(clone, tmp_path / "cache", 1)
    a, b = (r.read(ex.question, [ex.context], top_k=1) for r in (served, benched))
    assert a.no_answer_score is not None and b.no_answer_score is not None
    assert a.no_answer_score == pytest.approx(1e9 * b.no_answer_score)  # serving applies it
