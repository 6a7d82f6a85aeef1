"""`qaserve bench ingest`: reviews ingested through the real HTTP server per embedder runtime,
from a fresh clone (the fixture CSV, the shipped encoder, its ONNX export made on the fly)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from qaserve.cli import main
from qaserve.offline.bench_ingest import _stored, corpus
from qaserve_client.client import Client
from qaserve_client.schema import DocumentIn

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["bench", "ingest", *argv])
    return code, out.getvalue(), err.getvalue()


def test_bench_ingest_stores_every_review_through_each_server(tmp_path: Path) -> None:
    argv = ["--data", str(FIXTURE), "--limit", "6", "--batch-size", "4"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out")]
    code, stdout, stderr = _run(argv)
    assert code == 0, stderr
    report: dict[str, Any] = json.loads((tmp_path / "out" / "ingest.json").read_text())
    assert report["documents"] == 6 and set(report["runtimes"]) == {"torch", "onnx-int8"}
    formats = {name: row["format"] for name, row in report["runtimes"].items()}
    assert "torch" in formats["torch"] and "int8" in formats["onnx-int8"]
    for row in report["runtimes"].values():
        # fetched back through the API, text and all; two requests of 4 + 2 each
        assert row["stored"] == row["documents"] == 6 and row["requests"] == 2
        assert row["passages"] >= 6
        figures = ["reviews_per_s", "ingest_s", "embed_s", "write_s", "encoder_share"]
        for name in [*figures, "speedup", "encoder_speedup"]:
            assert math.isfinite(row[name]) and row[name] > 0, (name, row)
        assert math.isfinite(row["encoder_passages_per_s"]) and row["split_s"] >= 0
        # the stage calls are timed inside the requests: they fit in them
        assert 0 <= row["other_s"] < row["ingest_s"]
        assert row["split_s"] + row["embed_s"] + row["write_s"] <= row["ingest_s"] + 0.02
    assert report["runtimes"]["torch"]["speedup"] == 1.0
    (target,) = report["targets"]
    assert target["value"] == report["runtimes"]["onnx-int8"]["speedup"]
    assert "onnx-int8" in stdout and ("PASS" in stdout or "FAIL" in stdout)


def test_stored_counts_only_documents_the_api_gives_back_intact(api_server: Any) -> None:
    docs = [
        DocumentIn(id=f"bench-ingest-{i}", text=f"Review {i}: the bass is deep.") for i in range(3)
    ]
    with Client(api_server.url, api_key=api_server.write_key) as client:
        client.ingest(docs[:2])
        changed = DocumentIn(id=docs[1].id, text="not what was stored")
        assert _stored(client, docs) == 2  # the third was never sent
        assert _stored(client, [docs[0], changed]) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runtimes", "torch,cuda"], "--runtimes"),
        (["--runtimes", "torch,torch"], "--runtimes"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--data", "/nonexistent/subjqa.csv"], "bench ingest: "),
    ],
)
def test_bad_arguments_are_refused_before_anything_loads(argv: list[str], message: str) -> None:
    code, _, stderr = _run(["--data", str(FIXTURE), *argv])  # a later --data wins
    assert code == 2 and message in stderr


def test_the_corpus_is_every_unique_review_of_a_domain_folder(tmp_path: Path) -> None:
    header, *rows = FIXTURE.read_text().splitlines(keepends=True)
    (tmp_path / "train.csv").write_text("".join([header, *rows[:7]]))
    (tmp_path / "test.csv").write_text("".join([header, rows[0], *rows[7:]]))  # one repeated
    assert [d.id for d in corpus(tmp_path)] == [d.id for d in corpus(FIXTURE)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no SubjQA split"):
        corpus(tmp_path / "empty")
