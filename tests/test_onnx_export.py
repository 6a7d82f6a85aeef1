"""ONNX export of extractive-QA checkpoints: numerics, graph optimisation, int8, the cache."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_models import tiny_qa_checkpoint
from transformers import AutoTokenizer, BertForQuestionAnswering

from qaserve.config import packaged_embedder
from qaserve.deployments.onnx_export import (
    VARIANTS,
    checkpoint_hash,
    export_reader,
    write_reader_folder,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def _inputs(checkpoint: Path, questions: list[str], contexts: list[str]) -> dict[str, np.ndarray]:
    tok = AutoTokenizer.from_pretrained(checkpoint)
    enc = tok(questions, contexts, padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _onnx_logits(folder: Path, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    start, end = session.run(["start_logits", "end_logits"], {n: feeds[n] for n in names})
    return start, end


def _torch_logits(checkpoint: Path, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    model = BertForQuestionAnswering.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out.start_logits.numpy(), out.end_logits.numpy()


QUESTIONS = ["how is the battery?", "is the screen bright enough for outdoor use?", "why?"]
CONTEXTS = [
    "The battery lasts two days.",
    "Bright screen, but it washes out in direct sunlight and the colours look dull.",
    "Because the strap broke after a week, which is unacceptable for this price.",
]


@pytest.mark.parametrize("variant", ["fp32", "fp32-opt"])
def test_fp32_exports_match_torch_logits(
    qa_checkpoint: Path, onnx_cache: Path, variant: str
) -> None:
    folder = export_reader(str(qa_checkpoint), onnx_cache, variant)
    # Dynamic axes: a padded batch of 3 and a single unpadded pair, neither the traced shape.
    for qs, cs in [(QUESTIONS, CONTEXTS), (QUESTIONS[:1], CONTEXTS[1:2])]:
        feeds = _inputs(qa_checkpoint, qs, cs)
        want_start, want_end = _torch_logits(qa_checkpoint, feeds)
        got_start, got_end = _onnx_logits(folder, feeds)
        mask = feeds["attention_mask"] == 1  # padded positions are don't-cares
        np.testing.assert_allclose(got_start[mask], want_start[mask], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got_end[mask], want_end[mask], atol=1e-4, rtol=1e-4)


def test_optimised_graph_is_fused_and_int8_is_quantised(
    qa_checkpoint: Path, onnx_cache: Path
) -> None:
    opt = export_reader(str(qa_checkpoint), onnx_cache, "fp32-opt")
    meta = json.loads((opt / "export.json").read_text())
    assert meta["fused_ops"].get("Attention") == 2  # one per layer
    assert meta["fused_ops"].get("EmbedLayerNormalization") == 1
    ops = {n.op_type for n in onnx.load(str(opt / "model.onnx")).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops

    int8 = export_reader(str(qa_checkpoint), onnx_cache, "int8")
    ops = {n.op_type for n in onnx.load(str(int8 / "model.onnx")).graph.node}
    assert {"QAttention", "DynamicQuantizeMatMul"} & ops, ops
    assert "Attention" not in ops
    fp32_size = (
        (export_reader(str(qa_checkpoint), onnx_cache, "fp32") / "model.onnx").stat().st_size
    )
    assert (int8 / "model.onnx").stat().st_size < 0.4 * fp32_size


def test_export_folder_is_self_describing(qa_checkpoint: Path, onnx_cache: Path) -> None:
    folder = export_reader(str(qa_checkpoint), onnx_cache, "int8")
    assert folder == onnx_cache / "reader" / checkpoint_hash(qa_checkpoint) / "int8"
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "export.json"} <= {
        p.name for p in folder.iterdir()
    }
    meta = json.loads((folder / "export.json").read_text())
    assert meta["source"] == str(qa_checkpoint)
    assert meta["variant"] == "int8"
    assert meta["format"] == "onnx-int8"
    assert meta["hash"] == checkpoint_hash(qa_checkpoint)
    assert meta["model_bytes"] == (folder / "model.onnx").stat().st_size
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["quantization"]["weight_type"] == "QInt8"
    # Building int8 cached the steps it is made from; nothing half-written is left behind.
    root = folder.parent
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(VARIANTS)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_cache_is_reused_and_keyed_by_content(qa_checkpoint: Path, tmp_path: Path) -> None:
    onnx_cache = tmp_path / "onnx_cache"
    first = export_reader(str(qa_checkpoint), onnx_cache, "fp32")
    stamp = (first / "model.onnx").stat().st_mtime_ns
    meta = (first / "export.json").read_text()
    again = export_reader(qa_checkpoint, onnx_cache, "fp32")  # Path or str: same key
    assert again == first
    assert (again / "model.onnx").stat().st_mtime_ns == stamp
    assert (again / "export.json").read_text() == meta

    # The same files elsewhere share the entry; changed weights get a new one.
    other = tiny_qa_checkpoint(tmp_path / "copy", seed=0)
    assert export_reader(str(other), onnx_cache, "fp32") == first
    changed = tiny_qa_checkpoint(tmp_path / "changed", seed=1)
    assert checkpoint_hash(changed) != checkpoint_hash(qa_checkpoint)
    assert export_reader(str(changed), onnx_cache, "fp32") != first


def test_concurrent_exports_yield_one_complete_folder(qa_checkpoint: Path, tmp_path: Path) -> None:
    onnx_cache = tmp_path / "onnx_cache"
    results: list[Path] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(export_reader(str(qa_checkpoint), onnx_cache, "fp32-opt"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0] == results[1]
    root = results[0].parent
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "fp32",
        "fp32-opt",
    ]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_write_reader_folder_replaces_in_place(
    qa_checkpoint: Path, onnx_cache: Path, tmp_path: Path
):
    dest = tmp_path / "assets" / "reader"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old")
    out = write_reader_folder(str(qa_checkpoint), dest, "int8", cache_dir=onnx_cache)
    assert out == dest.resolve()
    names = {p.name for p in dest.iterdir()}
    assert {"model.onnx", "tokenizer.json", "export.json"} <= names
    assert "stale.txt" not in names
    assert [p.name for p in dest.parent.iterdir()] == ["reader"]  # no temp folders left


@pytest.mark.parametrize("kind", ["distilbert", "albert"])
def test_other_architectures(kind: str, onnx_cache: Path, tmp_path: Path) -> None:
    """DistilBERT takes no token_type_ids (BERT fusions still apply); ALBERT is not a type
    ORT's BERT optimiser knows, so it gets ORT's generic offline optimisation."""
    from transformers import (
        AlbertConfig,
        AlbertForQuestionAnswering,
        DistilBertConfig,
        DistilBertForQuestionAnswering,
    )

    from qaserve.config import ReaderConfig
    from qaserve.deployments.reader import Reader
    from qaserve_client.schema import ReadDocument

    tokenizer = AutoTokenizer.from_pretrained(packaged_embedder())
    torch.manual_seed(0)
    if kind == "distilbert":
        config: Any = DistilBertConfig(
            vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64
        )
        model: Any = DistilBertForQuestionAnswering(config)
    else:
        config = AlbertConfig(
            vocab_size=tokenizer.vocab_size,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
        model = AlbertForQuestionAnswering(config)
    model.eval().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    folder = export_reader(str(tmp_path), onnx_cache, "fp32-opt")
    meta = json.loads((folder / "export.json").read_text())
    want_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if kind == "albert" else [])
    assert meta["inputs"] == want_inputs
    assert ("bert" in meta["optimizer"]) == (kind == "distilbert")
    feeds = _inputs(tmp_path, QUESTIONS, CONTEXTS)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(feeds[k]) for k in want_inputs})
    got_start, _ = _onnx_logits(folder, feeds)
    mask = feeds["attention_mask"] == 1
    np.testing.assert_allclose(got_start[mask], out.start_logits.numpy()[mask], atol=1e-4)

    reader = Reader(ReaderConfig(model=str(tmp_path)), onnx_cache, threads=1)  # int8
    got = reader.read(QUESTIONS[1], [ReadDocument(text=CONTEXTS[1])], top_k=2)
    assert [a.answer for a in got.answers] == [CONTEXTS[1][a.start : a.end] for a in got.answers]
    assert reader.info().format == "onnx-int8"


def test_unknown_variant_and_missing_checkpoint(onnx_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="variant"):
        export_reader(str(tmp_path), onnx_cache, "int4")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config"):
        export_reader(str(empty), onnx_cache, "fp32")
    with pytest.raises(FileNotFoundError):
        export_reader(str(tmp_path / "missing"), onnx_cache, "fp32")
