"""`qaserve fit-ensemble`: fit the ensemble's learned policy (qaserve.deployments.ensemble_policy)
on dev splits, through the server's own query pipeline and the book protocol.

Per domain: every review of the domain indexed (qaserve.offline.protocol.load_domain), each
question of the split asked in ensemble mode with its item filter; `Pipeline.evidence` gives
what the ensemble sees (retrieved documents, the reader's spans, and the generator's scores
of them, or its generated text with `--generator-use generate`), from which each candidate's
features and official SQuAD 2.0 F1 (its soft label) are collected. One logistic model is fitted
over every domain; its L2 strength is chosen by 5-fold cross-validation over questions (the
F1 of the decisions), then it is refitted on all of them.

Written: the policy (`--output`, JSON; its `fit` holds the dev figures: official F1 of the
policy in-sample and cross-validated, the extractive pipeline's answer, always "no answer",
and the oracle over the candidates, per domain and overall) and the collected features
beside it (`<output stem>.features.json`), which `--features` refits from without running
the pipeline again.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.deployments.ensemble_policy import (
    GeneratorUse,
    LogisticPolicy,
    candidates,
    feature_names,
)
from qaserve.metrics import mean, squad_em_f1
from qaserve.offline.command import Command, add_settings

L2_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
FOLDS = 5
FEATURES_FORMAT = "ensemble-features"


def _golds(ex: Any) -> list[str]:
    return [a.text for a in ex.answers] or [""]


def _f1(text: str, golds: Sequence[str]) -> float:
    return squad_em_f1(text, golds)[1]


def collect(
    data: Path,
    split: str,
    domains: Sequence[str],
    generator_use: GeneratorUse,
    limit: int | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pipeline over each domain's questions; one row per question: its golds, its
    candidates' texts, features and F1, and the extractive pipeline's answer."""

    from qaserve.config import EngineConfig
    from qaserve.deployments.ensemble import Ensemble
    from qaserve.offline.protocol import item_query, served_questions
    from qaserve.runtime.local import Engine

    rows: list[dict[str, Any]] = []
    seconds: list[float] = []
    stages: dict[str, list[float]] = {}
    overrides: dict[str, Any] = {
        **(settings or {}),
        "ensemble.generator_use": generator_use,
        "ensemble.policy": None,
    }
    with tempfile.TemporaryDirectory(prefix="qaserve-fit-ensemble-") as tmp:
        engine = Engine(EngineConfig.load(None, data_dir=Path(tmp), **overrides))
        reader_only = Ensemble(engine.cfg.ensemble.model_copy(update={"policy": None}))
        try:
            runs = served_questions(engine, data, split, domains, limit, "fit", progress)
            for name, ex, collection in runs:
                request = item_query(ex, collection, "ensemble")
                t0 = time.perf_counter()
                ev = engine.run(engine.pipeline.evidence(request))
                seconds.append(time.perf_counter() - t0)
                for stage, ms in ev.timings.items():
                    stages.setdefault(stage, []).append(ms)
                golds = _golds(ex)
                row: dict[str, Any] = {"domain": name, "id": ex.id, "golds": golds}
                if ev.read is None:  # nothing retrieved: the answer is "no answer"
                    row.update(texts=[""], features=[], f1=[_f1("", golds)], reader="")
                else:
                    cands = candidates(ev.read, ev.documents, ev.scored, ev.generated)
                    row.update(
                        texts=cands.texts,
                        features=cands.features,
                        f1=[_f1(t, golds) for t in cands.texts],
                        reader=reader_only.combine("extractive", ev.read, None).text,
                    )
                rows.append(row)
        finally:
            engine.close()
    return {
        "kind": FEATURES_FORMAT,
        "generator_use": generator_use,
        "data": str(data),
        "split": split,
        "domains": list(domains),
        "settings": {k: v for k, v in overrides.items() if k != "ensemble.policy"},
        "s_per_question": round(mean(seconds), 3),
        "stage_ms_median": {k: round(statistics.median(v), 1) for k, v in stages.items()},
        "rows": rows,
    }


def _design(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    feats = [f for r in rows for f in r["features"]]
    labels = [y for r in rows for y in r["f1"][: len(r["features"])]]
    x = np.array([[f[n] for n in names] for f in feats], dtype=np.float64)
    return x.reshape(len(feats), len(names)), np.array(labels, dtype=np.float64)


def decide(policy: LogisticPolicy, row: dict[str, Any]) -> int:
    """The candidate the policy answers a collected question with (0 when it has none)."""
    if not row["features"]:
        return 0
    x = np.array([[f[n] for n in policy.features] for f in row["features"]], dtype=np.float64)
    return int(np.argmax(policy.probabilities(x)))


def _folds(n: int, folds: int, seed: int = 0) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    fold = [0] * n
    for rank, i in enumerate(order):
        fold[i] = rank % folds
    return fold


def cross_validated(
    rows: Sequence[dict[str, Any]], names: Sequence[str], use: GeneratorUse, l2: float
) -> list[int]:
    """Each question's decision by a policy fitted on the other folds."""
    k = min(FOLDS, len(rows))
    fold = _folds(len(rows), k)
    picks = [0] * len(rows)
    for f in range(k):
        train = [r for r, g in zip(rows, fold, strict=True) if g != f]
        x, y = _design(train, names)
        if len(x) == 0:
            continue
        policy = LogisticPolicy.fit(x, y, names, use, l2)
        for i, row in enumerate(rows):
            if fold[i] == f:
                picks[i] = decide(policy, row)
    return picks


def figures(rows: Sequence[dict[str, Any]], picks: dict[str, list[int]]) -> dict[str, Any]:
    """Official F1 per domain and overall: each policy's picks, the extractive pipeline,
    always "no answer", and the best candidate (the ceiling any policy over them has)."""
    out: dict[str, Any] = {}
    groups = {"all": list(range(len(rows)))}
    for i, r in enumerate(rows):
        groups.setdefault(r["domain"], []).append(i)
    for name, idx in groups.items():
        fig: dict[str, Any] = {"n": len(idx)}
        for key, chosen in picks.items():
            fig[key] = round(mean(rows[i]["f1"][chosen[i]] for i in idx), 4)
        fig["reader"] = round(mean(_f1(rows[i]["reader"], rows[i]["golds"]) for i in idx), 4)
        fig["always_no_answer"] = round(mean(_f1("", rows[i]["golds"]) for i in idx), 4)
        fig["oracle"] = round(mean(max(rows[i]["f1"]) for i in idx), 4)
        out[name] = fig
    return out


def fit_policy(collected: dict[str, Any], l2_grid: Sequence[float] = L2_GRID) -> LogisticPolicy:
    """L2 by cross-validated F1 (ties: the stronger penalty), then refitted on every question."""
    rows = collected["rows"]
    use: GeneratorUse = collected["generator_use"]
    names = feature_names(use)
    if not any(r["features"] for r in rows):
        raise SystemExit("no question had a candidate to learn from")
    cv: dict[float, list[int]] = {}
    cv_f1: dict[str, float] = {}
    for l2 in l2_grid:
        cv[l2] = cross_validated(rows, names, use, l2)
        cv_f1[str(l2)] = round(mean(r["f1"][p] for r, p in zip(rows, cv[l2], strict=True)), 4)
    best = max(l2_grid, key=lambda l2: (cv_f1[str(l2)], l2))
    x, y = _design(rows, names)
    policy = LogisticPolicy.fit(x, y, names, use, best)
    in_sample = [decide(policy, r) for r in rows]
    policy.fit_report = {
        "data": collected["data"],
        "split": collected["split"],
        "domains": collected["domains"],
        "questions": len(rows),
        "candidates": len(x),
        "settings": collected["settings"],
        "s_per_question": collected["s_per_question"],
        "stage_ms_median": collected["stage_ms_median"],
        "l2_cv_f1": cv_f1,
        "f1": figures(rows, {"policy": in_sample, "policy_cv": cv[best]}),
        "metric": "SQuAD 2.0 official F1 (qaserve.metrics.squad_em_f1)",
    }
    return policy


def features_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.features.json")


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="a folder of SubjQA domain folders")
    p.add_argument("--split", default="dev", help="the split to fit on (default dev)")
    p.add_argument("--domains", nargs="+", default=None, help="default: every domain in --data")
    p.add_argument("--output", type=Path, required=True, help="the policy file (JSON)")
    p.add_argument(
        "--generator-use",
        choices=["score", "generate"],
        default="score",
        help="the generator's evidence: scores of the spans (default) or generated text",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N questions a domain")
    p.add_argument(
        "--features", type=Path, default=None, help="refit from collected features (no pipeline)"
    )
    add_settings(p, "ensemble.score_documents=3")
    p.add_argument("--quiet", action="store_true")


def _cmd(args: argparse.Namespace) -> int:
    if args.features is not None:
        collected = json.loads(args.features.read_text())
        if collected.get("kind") != FEATURES_FORMAT:
            raise SystemExit(f"{args.features}: not a features file of fit-ensemble")
    else:
        if args.data is None or not args.data.is_dir():
            raise SystemExit("--data must be a folder of SubjQA domain folders")
        from qaserve.offline.protocol import domains_in

        domains = args.domains or domains_in(args.data, args.split)
        if not domains:
            raise SystemExit(f"no domain under {args.data} has a {args.split} split")
        collected = collect(
            args.data,
            args.split,
            domains,
            args.generator_use,
            limit=args.limit,
            settings=dict(args.settings),
            progress=not args.quiet,
        )
        features_path(args.output).parent.mkdir(parents=True, exist_ok=True)
        features_path(args.output).write_text(json.dumps(collected) + "\n")
    policy = fit_policy(collected)
    policy.save(args.output)
    report = policy.fit_report
    print(f"policy: {args.output} (l2 {policy.l2:g}, {report['questions']} questions)")
    print(f"{'domain':<14}{'n':>5}{'policy':>9}{'cv':>9}{'reader':>9}{'no-ans':>9}{'oracle':>9}")
    for name, fig in report["f1"].items():
        cells = [fig[k] for k in ("policy", "policy_cv", "reader", "always_no_answer", "oracle")]
        print(f"{name:<14}{fig['n']:>5}" + "".join(f"{c:>9.4f}" for c in cells))
    weights = sorted(zip(policy.features, policy.weights, strict=True), key=lambda w: -abs(w[1]))
    print(
        "weights (standardised):", ", ".join(f"{n} {w:+.2f}" for n, w in weights), file=sys.stderr
    )
    return 0


COMMAND = Command(
    "fit-ensemble",
    "fit the ensemble's learned policy on SubjQA dev splits",
    _add_args,
    _cmd,
    module="qaserve.offline.fit_ensemble",
    doc=__doc__,
)
register = COMMAND.register
