"""`qaserve bench reader` end to end on a tiny random QA model and the SubjQA fixture."""

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
from test_reader import _save, random_model
from transformers import AutoTokenizer

from qaserve.cli import main
from qaserve.config import ReaderConfig, packaged_embedder
from qaserve.deployments.onnx_export import export_reader, write_reader_folder
from qaserve.deployments.reader import Reader
from qaserve.errors import ConfigError
from qaserve.offline.bench import VARIANTS, TorchReader, build_readers, locate_models
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
def run(tmp_path_factory: pytest.TempPathFactory, ckpt: Path, cache: Path) -> dict[str, Any]:
    """The CLI once, on every fixture question; its stdout, JSON and output folder."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "reader", "--model", str(ckpt), "--data", str(FIXTURE)]
    argv += ["--threads", "1", "--output", str(out), "--cache-dir", str(cache)]
    argv += ["--warmup", "2", "--batch-sizes", "4,8", "--quiet"]
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


def test_cli_writes_json_and_png_for_every_variant(run: dict[str, Any], ckpt: Path) -> None:
    report, out = run["report"], run["out"]
    assert run["rc"] == 0
    assert (out / "reader.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(report["variants"]) == list(VARIANTS)
    assert report["questions"] == len(load_subjqa(FIXTURE)) == 11
    assert report["baseline"] == "torch"
    assert "pipeline" in report["note"]
    for key in ("cpu_model", "cpu_count", "threads", "date", "git_commit", "torch"):
        assert key in report["machine"]
    assert report["machine"]["threads"] == 1
    for name, row in report["variants"].items():
        assert 0.0 <= row["em"] <= row["f1"] <= 1.0, name
        lat = row["latency_ms"]
        assert 0 < lat["median"] <= lat["p95"], name
        assert set(row["throughput_qps"]) == {"4", "8"} and min(row["throughput_qps"].values()) > 0
        assert len(run["predictions"][name]) == 11
    torch_mb = (ckpt / "model.safetensors").stat().st_size / 2**20
    assert report["variants"]["torch"]["size_mb"] == pytest.approx(torch_mb, abs=0.01)
    int8 = Path(report["variants"]["onnx-int8"]["path"])
    assert report["variants"]["onnx-int8"]["size_mb"] == pytest.approx(
        (int8 / "model.onnx").stat().st_size / 2**20, abs=0.01
    )
    # The table names every variant; each of the four targets gets a verdict.
    for name in VARIANTS:
        assert name in run["stdout"]
    verdicts = [ln for ln in run["stdout"].splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == len(report["targets"]) == 4


def test_ratios_follow_from_the_json(run: dict[str, Any]) -> None:
    rows = run["report"]["variants"]
    base = rows["torch"]
    for row in rows.values():
        r = row["ratios"]
        med = base["latency_ms"]["median"] / row["latency_ms"]["median"]
        assert r["speedup_median"] == pytest.approx(med, rel=2e-3)
        assert r["size_ratio"] == pytest.approx(base["size_mb"] / row["size_mb"], rel=2e-3)
        assert r["em_delta_points"] == pytest.approx(100 * (row["em"] - base["em"]), abs=0.01)
        assert r["f1_delta_points"] == pytest.approx(100 * (row["f1"] - base["f1"]), abs=0.01)
        for k, qps in row["throughput_qps"].items():
            want = qps / base["throughput_qps"][k]
            assert r[f"throughput_ratio_{k}"] == pytest.approx(want, rel=2e-3)
    assert rows["torch"]["ratios"]["speedup_median"] == 1.0
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
