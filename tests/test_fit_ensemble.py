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

    # The figures are the saved policy's decisions on the saved features, by the official rule
    # (unweighted, and weighted to the train split's answerable share).
    fig = report["f1_unweighted"]["all"]
    assert fig["policy"] == round(mean(r["f1"][decide(policy, r)] for r in rows), 4)
    assert fig["always_no_answer"] == round(mean(squad_em_f1("", r["golds"])[1] for r in rows), 4)
    from qaserve.offline.fit_ensemble import reweigh

    reweigh(rows, {d: v["target"] for d, v in report["answerable_share"].items()})
    weights = [r["weight"] for r in rows]
    nulls = [squad_em_f1("", r["golds"])[1] for r in rows]
    expected = sum(w * f for w, f in zip(weights, nulls, strict=True)) / sum(weights)
    assert report["f1"]["all"]["always_no_answer"] == round(expected, 4)
    fig = report["f1"]["all"]
    held_out = ("policy_cv", "reader_features_cv", "policy_other_domains")
    assert fig["oracle"] >= max(fig["policy"], fig["reader"], *(fig[k] for k in held_out))
    assert "other-dom" in printed and "cv-reader" in printed
    assert set(report["l2_cv_f1"]) == {"0.01", "0.1", "1.0", "10.0", "100.0"}

    # Dev questions weighed to the train split's answerable share (the default), both figures kept.
    shares = report["answerable_share"]
    assert set(shares) == set(DOMAINS) and all(0 < v["target"] < 1 for v in shares.values())
    assert set(report["f1_unweighted"]) == set(report["f1"])

    # --apply decides with a saved policy on collected features and fits nothing: on the rows
    # it was fitted on, it reproduces the policy's own (unweighted) figure.
    applied_path = tmp_path / "applied.json"
    printed = _run(
        [
            *("fit-ensemble", "--features", str(features_path(output))),
            *("--apply", str(output), "--output", str(applied_path)),
        ]
    )
    applied = json.loads(applied_path.read_text())
    assert applied["f1"]["all"]["policy"] == report["f1_unweighted"]["all"]["policy"]
    assert "policy" in printed and not features_path(applied_path).exists()
    # Beside it, how often each abstains, counted from the collected rows.
    rows = json.loads(features_path(output).read_text())["rows"]
    rates = applied["no_answer_rate"]["all"]
    assert rates["reader"] == round(sum(r["reader"] == "" for r in rows) / len(rows), 4)
    unanswerable = sum(not any(r["golds"]) for r in rows) / len(rows)
    assert rates["unanswerable"] == round(unanswerable, 4) and 0 <= rates["policy"] <= 1
    assert "unanswerable" in printed

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


def test_other_domains_decides_each_domain_by_a_policy_fitted_on_the_others() -> None:
    """Domain A's questions are answered by a span, domain B's by "no answer", with the same
    features: a policy that never saw a domain must pick what the other domain taught it."""
    from qaserve.deployments.ensemble_policy import READER_FEATURES
    from qaserve.offline.fit_ensemble import cross_validated

    def candidate(kind: str) -> dict[str, float]:
        feats = dict.fromkeys(READER_FEATURES, 0.0)
        feats[kind] = 1.0
        return feats

    rows = [
        {"domain": d, "features": [candidate("span"), candidate("null")], "f1": f1}
        for d, f1 in (("a", [1.0, 0.0]), ("b", [0.0, 1.0]))
        for _ in range(6)
    ]
    held_out = cross_validated(rows, READER_FEATURES, "score", 1.0, by_domain=True)
    assert held_out == [1] * 6 + [0] * 6  # each domain gets the other's lesson
    pooled = cross_validated(rows, READER_FEATURES, "score", 1.0)
    assert len(pooled) == 12 and set(pooled) <= {0, 1}


def test_sample_weights_count_like_repeated_rows() -> None:
    """Weight 2 is the row twice, weight 0 is the row dropped: the reweighing of dev questions
    to the train split's answerable share rests on this."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(float)
    names = ["span_reader", "span_logodds", "null_reader"]
    w = np.array([2.0] * 10 + [0.0] * 10 + [1.0] * 20)
    x_rep = np.vstack([x[:10], x[:10], x[20:]])
    y_rep = np.concatenate([y[:10], y[:10], y[20:]])
    a = LogisticPolicy.fit(x, y, names, "score", 1.0, sample_weight=w)
    b = LogisticPolicy.fit(x_rep, y_rep, names, "score", 1.0)
    # Standardisation uses the unweighted rows, so compare decisions, not raw weights.
    assert np.allclose(a.probabilities(x), b.probabilities(x), atol=0.05)
    assert np.array_equal(a.probabilities(x) > 0.5, b.probabilities(x) > 0.5)
    with pytest.raises(ValueError):
        LogisticPolicy.fit(x, y, names, "score", 1.0, sample_weight=-w)


def test_reweigh_gives_each_domain_the_target_answerable_share() -> None:
    from qaserve.offline.fit_ensemble import reweigh

    rows: list[dict[str, Any]] = [
        {"domain": "a", "golds": ["x"] if i < 3 else [""]} for i in range(10)
    ]
    rows += [{"domain": "b", "golds": ["y", ""] if i < 6 else [""]} for i in range(8)]
    report = reweigh(rows, {"a": 0.6, "b": 0.5})
    assert report == {
        "a": {"fitted_on": 0.3, "target": 0.6},
        "b": {"fitted_on": 0.75, "target": 0.5},
    }
    for name, want in (("a", 0.6), ("b", 0.5)):
        mine = [r for r in rows if r["domain"] == name]
        total = sum(r["weight"] for r in mine)
        share = sum(r["weight"] for r in mine if any(g for g in r["golds"])) / total
        assert share == pytest.approx(want) and total == pytest.approx(len(mine))
    with pytest.raises(SystemExit):
        reweigh([{"domain": "c", "golds": [""]}], {"c": 0.5})
