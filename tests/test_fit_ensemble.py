"""`qaserve fit-ensemble`: the server's own pipeline over two small domains (tiny reader and
generator, the packaged encoder), the fitted policy's figures, its refit from the saved
features, and a server configured with it answering what the policy decided at fit time."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from tiny_models import tiny_causal_lm_dir, tiny_reader_dir

from qaserve.cli import main
from qaserve.deployments.ensemble_policy import LogisticPolicy
from qaserve.metrics import mean, squad_em_f1
from qaserve.offline.fit_ensemble import decide, features_path

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"
DOMAINS = ("electronics", "grocery")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two domain folders from the fixture's rows (dev: the first 8 rows, 6 questions)."""
    root = tmp_path_factory.mktemp("subjqa")
    with open(FIXTURE, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for name in DOMAINS:
        (root / name).mkdir()
        for split, part in {"dev": rows[:8], "train": rows[8:]}.items():
            with open(root / name / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(part)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("models")
    cache = root / "cache"
    reader = tiny_reader_dir(root / "reader", cache)
    generator = tiny_causal_lm_dir(root / "generator")
    settings = [f"reader.model={reader}", "reader.optimize=false"]
    settings += [f"generator.model={generator}", f"cache_dir={cache}"]
    return [arg for s in settings for arg in ("--set", s)]


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    return out.getvalue()


def test_fit_ensemble_end_to_end(data: Path, models: list[str], tmp_path: Path) -> None:
    output = tmp_path / "policy.json"
    argv = ["fit-ensemble", "--data", str(data), "--split", "dev", "--output", str(output)]
    printed = _run([*argv, *models, "--quiet"])
    assert "policy_cv" not in printed and "oracle" in printed

    policy = LogisticPolicy.load(output)
    report = policy.fit_report
    collected: dict[str, Any] = json.loads(features_path(output).read_text())
    rows = collected["rows"]
    from qaserve.offline.protocol import load_domain

    per_domain = len(load_domain(data / "grocery", "dev").questions)
    assert report["domains"] == list(DOMAINS)
    assert report["questions"] == len(rows) == 2 * per_domain > 8
    assert policy.generator_use == "score" and "span_gen" in policy.features
    assert {r["domain"] for r in rows} == set(DOMAINS)
    assert set(report["f1"]) == {"all", *DOMAINS}
    assert any(len(r["texts"]) > 1 for r in rows)  # the reader found spans to weigh
    # ... and the generator scored them (log-likelihoods are < 0), "no answer" included
    weighed = [r["features"] for r in rows if len(r["texts"]) > 1]
    assert all(f[-1]["null_gen"] < 0 and f[0]["span_gen"] < 0 for f in weighed)

    # The figures are the saved policy's decisions on the saved features, by the official rule.
    fig = report["f1"]["all"]
    assert fig["policy"] == round(mean(r["f1"][decide(policy, r)] for r in rows), 4)
    assert fig["always_no_answer"] == round(mean(squad_em_f1("", r["golds"])[1] for r in rows), 4)
    assert fig["oracle"] >= max(fig["policy"], fig["policy_cv"], fig["reader"])
    assert set(report["l2_cv_f1"]) == {"0.01", "0.1", "1.0", "10.0", "100.0"}

    # Refitting from the saved features needs no pipeline and gives the same policy.
    again = tmp_path / "again.json"
    _run(["fit-ensemble", "--features", str(features_path(output)), "--output", str(again)])
    assert LogisticPolicy.load(again).weights.tolist() == policy.weights.tolist()

    # A server configured with the policy answers what the policy decided at fit time.
    from qaserve.config import EngineConfig
    from qaserve.runtime.local import Engine
    from qaserve_client.schema import QueryRequest

    settings = dict(s.split("=", 1) for s in models[1::2])
    settings["reader.optimize"] = False  # type: ignore[assignment]
    engine = Engine(
        EngineConfig.load(
            None,
            data_dir=tmp_path / "store",
            **settings,
            **{"ensemble.generator_use": "score", "ensemble.policy": str(output)},
        )
    )
    try:
        domain = load_domain(data / "grocery", "dev")
        engine.ingest(domain.reviews, collection="served")
        by_id = {r["id"]: r for r in rows if r["domain"] == "grocery"}
        for ex in domain.questions[:4]:
            request = QueryRequest(
                question=ex.question, filters={"item_id": ex.item_id}, collection="served"
            )
            answer = engine.query(request).answer
            row = by_id[ex.id]
            assert answer.text == row["texts"][decide(policy, row)]
            assert answer.source == ("none" if not answer.text else "both")
    finally:
        engine.close()
