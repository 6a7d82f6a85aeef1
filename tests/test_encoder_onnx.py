"""The retriever's encoder on ONNX Runtime: the same vector space as sentence-transformers,
served by the Retriever, and `qaserve bench encoder` from a fresh clone."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qaserve.cli import main
from qaserve.config import EmbedderConfig, EngineConfig
from qaserve.deployments.encoder_onnx import OnnxEmbedder, pool
from qaserve.deployments.retriever import Embedder, Retriever, build_embedder
from qaserve.loaders import sample_documents

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoder-cache")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [*[d.text for d in sample_documents()][:24], "How is the sound?", "battery"]


@pytest.fixture(scope="module")
def torch_vectors(texts: list[str]) -> np.ndarray:
    return Embedder(EmbedderConfig(batch_size=8), threads=1).embed(texts)


@pytest.mark.parametrize(("runtime", "floor"), [("onnx-fp32", 0.9999), ("onnx-int8", 0.97)])
def test_onnx_vectors_match_the_torch_encoder(
    runtime: str, floor: float, cache: Path, texts: list[str], torch_vectors: np.ndarray
) -> None:
    onnx = OnnxEmbedder(EmbedderConfig(runtime=runtime, batch_size=8), cache, threads=1)
    vectors = onnx.embed(texts)
    assert vectors.shape == torch_vectors.shape and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = (vectors * torch_vectors).sum(axis=1)
    assert cosine.min() > floor, cosine.min()
    # The document a question gets is the torch encoder's best, up to a near tie (what
    # retrieval depends on; recall itself is `bench encoder`'s to measure).
    for question in (len(texts) - 2, len(texts) - 1):
        by_torch = torch_vectors[:-2] @ torch_vectors[question]
        top = int(np.argmax(vectors[:-2] @ vectors[question]))
        assert by_torch[top] >= by_torch.max() - 0.01, (top, np.argsort(-by_torch)[:3])


def test_mean_pooling_ignores_padding() -> None:
    hidden = np.array([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(pool(hidden, mask, "mean"), [[1.0, 0.0]])
    np.testing.assert_allclose(pool(hidden, mask, "cls"), [[1.0, 0.0]])


def test_retriever_on_the_int8_encoder(tmp_path: Path) -> None:
    cfg = EngineConfig(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        embedder=EmbedderConfig(runtime="onnx-int8"),
    )
    embedder = build_embedder(cfg, 1, {})
    assert isinstance(embedder, OnnxEmbedder) and "int8" in embedder.info().format
    with Retriever(cfg, embedder=embedder) as retriever:
        docs = sample_documents()[:12]
        retriever.ingest(docs)
        hits = retriever.retrieve(docs[3].text[:200], top_k=3)
        assert hits[0].id == docs[3].id


def test_bench_encoder_runs_on_the_fixture(tmp_path: Path, cache: Path) -> None:
    argv = ["bench", "encoder", "--data", str(FIXTURE), "--output", str(tmp_path)]
    argv += ["--cache-dir", str(cache), "--limit", "8", "--speed-passages", "16"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    report: dict[str, Any] = json.loads((tmp_path / "encoder.json").read_text())
    assert set(report["runtimes"]) == {"torch", "onnx-fp32", "onnx-int8"}
    assert report["questions"] == 8
    for row in report["runtimes"].values():
        assert row["passages_per_s"] > 0 and 0.0 <= row["strict@1"] <= row["strict@3"] <= 1.0
    assert report["runtimes"]["torch"]["speedup"] == 1.0
    assert "onnx-int8" in stdout.getvalue()


def test_a_gpu_replica_embeds_with_torch() -> None:
    """ONNX Runtime here has only its CPU provider: a replica granted a GPU runs the encoder in
    torch on it instead of leaving the GPU idle; on the CPU the configured runtime holds."""
    from qaserve.deployments.retriever import embedder_runtime

    cpu = EngineConfig(embedder=EmbedderConfig(runtime="onnx-int8"))
    assert embedder_runtime(cpu) == "onnx-int8"
    gpu = EngineConfig(embedder=EmbedderConfig(runtime="onnx-int8", device="cuda"))
    assert embedder_runtime(gpu) == "torch"
    torch_cfg = EngineConfig(embedder=EmbedderConfig(runtime="torch"))
    assert embedder_runtime(torch_cfg) == "torch"
