"""`qaserve fit-ensemble`: fit the ensemble's learned policy (qaserve.deployments.ensemble_policy)
on dev splits, through the server's own query pipeline and the book protocol.

Per domain: every review of the domain indexed (qaserve.offline.protocol.load_domain), each
question of the split asked in ensemble mode with its item filter; `Pipeline.evidence` gives
what the ensemble sees (retrieved documents, the reader's spans, and the generator's scores
of them, or its generated text with `--generator-use generate`), from which each candidate's
features and official SQuAD 2.0 F1 (its soft label) are collected. One logistic model is fitted
over every domain; its L2 strength is chosen by 5-fold cross-validation over questions (the
F1 of the decisions), then it is refitted on all of them.

The dev splits hold more unanswerable questions than train and test (answerable 39-62 % of dev
questions, 54-75 % of train's, docs/RESULTS.md): fitted on dev as it is, a policy learns to
abstain too often. `--answerable-share train` (the default) weighs each domain's dev questions
so that their answerable share is that of its train split (importance weights, known without
looking at test); the dev figures are then reported under the same weights, beside the
unweighted ones.

`--apply POLICY...` fits nothing: it runs (or reads, `--features`) the pipeline on a split and
reports each saved policy's official F1 there beside the extractive pipeline, always "no
answer" and the oracle (unweighted): how a dev-fitted policy is measured on test, once.

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
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.deployments.ensemble_policy import (
    READER_FEATURES,
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


def _design(
    rows: Sequence[dict[str, Any]], names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, soft labels and sample weights (the question's weight) of every candidate."""
    feats = [f for r in rows for f in r["features"]]
    labels = [y for r in rows for y in r["f1"][: len(r["features"])]]
    weights = [r.get("weight", 1.0) for r in rows for _ in r["features"]]
    x = np.array([[f[n] for n in names] for f in feats], dtype=np.float64)
    return (
        x.reshape(len(feats), len(names)),
        np.array(labels, dtype=np.float64),
        np.array(weights, dtype=np.float64),
    )


def _answerable(golds: Sequence[str]) -> bool:
    return any(g for g in golds)


def answerable_shares(data: Path, split: str, domains: Sequence[str]) -> dict[str, float]:
    """Each domain's share of answerable questions in `split` (any non-empty gold)."""
    from qaserve.offline.protocol import answerable
    from qaserve.subjqa import load_subjqa

    shares = {}
    for name in domains:
        folder = data / name
        folder = folder / "splits" if (folder / "splits").is_dir() else folder
        questions = load_subjqa(folder, split)
        if not questions:
            raise SystemExit(f"{folder}: no {split} questions to take the answerable share from")
        shares[name] = sum(answerable(ex) for ex in questions) / len(questions)
    return shares


def reweigh(rows: list[dict[str, Any]], target: dict[str, float]) -> dict[str, Any]:
    """Weigh each row so that its domain's answerable share becomes `target[domain]`;
    returns {domain: {"fitted_on": share, "target": share}}."""
    report = {}
    for name, want in target.items():
        mine = [r for r in rows if r["domain"] == name]
        have = sum(_answerable(r["golds"]) for r in mine) / max(len(mine), 1)
        if not 0.0 < have < 1.0:
            raise SystemExit(f"{name}: every question is on one side; cannot reweigh it")
        for r in mine:
            r["weight"] = want / have if _answerable(r["golds"]) else (1 - want) / (1 - have)
        report[name] = {"fitted_on": round(have, 4), "target": round(want, 4)}
    return report


def _mean(values: Sequence[float], weights: Sequence[float]) -> float:
    return float(np.average(values, weights=weights)) if values else 0.0


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
    rows: Sequence[dict[str, Any]],
    names: Sequence[str],
    use: GeneratorUse,
    l2: float,
    by_domain: bool = False,
) -> list[int]:
    """Each question's decision by a policy fitted on the other folds (`by_domain`: the other
    domains; with one domain, nothing is left to fit on and every question keeps candidate 0)."""
    if by_domain:
        names_of = sorted({r["domain"] for r in rows})
        fold = [names_of.index(r["domain"]) for r in rows]
        k = len(names_of)
    else:
        k = min(FOLDS, len(rows))
        fold = _folds(len(rows), k)
    picks = [0] * len(rows)
    for f in range(k):
        train = [r for r, g in zip(rows, fold, strict=True) if g != f]
        x, y, w = _design(train, names)
        if len(x) == 0:
            continue
        policy = LogisticPolicy.fit(x, y, names, use, l2, sample_weight=w)
        for i, row in enumerate(rows):
            if fold[i] == f:
                picks[i] = decide(policy, row)
    return picks


def _groups(rows: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Row indices of every question ("all") and of each domain, in order of appearance."""
    groups = {"all": list(range(len(rows)))}
    for i, r in enumerate(rows):
        groups.setdefault(r["domain"], []).append(i)
    return groups


def figures(
    rows: Sequence[dict[str, Any]], picks: dict[str, list[int]], weighted: bool = True
) -> dict[str, Any]:
    """Official F1 per domain and overall (each question by its weight unless not `weighted`):
    each policy's picks, the extractive pipeline, always "no answer", and the best candidate
    (the ceiling any policy over them has)."""
    out: dict[str, Any] = {}
    for name, idx in _groups(rows).items():
        w = [rows[i].get("weight", 1.0) if weighted else 1.0 for i in idx]

        def avg(values: Any, w: list[float] = w) -> float:
            return round(_mean(list(values), w), 4)

        fig: dict[str, Any] = {"n": len(idx)}
        for key, chosen in picks.items():
            fig[key] = avg(rows[i]["f1"][chosen[i]] for i in idx)
        fig["reader"] = avg(_f1(rows[i]["reader"], rows[i]["golds"]) for i in idx)
        fig["always_no_answer"] = avg(_f1("", rows[i]["golds"]) for i in idx)
        fig["oracle"] = avg(max(rows[i]["f1"]) for i in idx)
        out[name] = fig
    return out


def no_answer_rates(rows: Sequence[dict[str, Any]], picks: dict[str, list[int]]) -> dict[str, Any]:
    """How often each policy and the extractive pipeline answer "no answer", beside the share
    of questions that have no gold span: a policy that abstains far more often than a split is
    unanswerable was fitted on a split with another answerable share."""
    out: dict[str, Any] = {}
    for name, idx in _groups(rows).items():
        fig: dict[str, Any] = {"n": len(idx)}
        for key, chosen in picks.items():
            fig[key] = round(
                mean(
                    [rows[i]["texts"][chosen[i]] == "" if rows[i]["texts"] else True for i in idx]
                ),
                4,
            )
        fig["reader"] = round(mean([rows[i]["reader"] == "" for i in idx]), 4)
        fig["unanswerable"] = round(mean([not _answerable(rows[i]["golds"]) for i in idx]), 4)
        out[name] = fig
    return out


def fit_policy(
    collected: dict[str, Any],
    l2_grid: Sequence[float] = L2_GRID,
    names: Sequence[str] | None = None,
    shares: dict[str, Any] | None = None,
) -> LogisticPolicy:
    """L2 by cross-validated F1 (ties: the stronger penalty), then refitted on every question.
    `names`: the features (default: all of the collected kind); rows carry their weights."""
    rows = collected["rows"]
    use: GeneratorUse = collected["generator_use"]
    names = list(names or feature_names(use))
    if not any(r["features"] for r in rows):
        raise SystemExit("no question had a candidate to learn from")
    weights = [r.get("weight", 1.0) for r in rows]
    cv: dict[float, list[int]] = {}
    cv_f1: dict[str, float] = {}
    for l2 in l2_grid:
        cv[l2] = cross_validated(rows, names, use, l2)
        f1 = [r["f1"][p] for r, p in zip(rows, cv[l2], strict=True)]
        cv_f1[str(l2)] = round(_mean(f1, weights), 4)
    best = max(l2_grid, key=lambda l2: (cv_f1[str(l2)], l2))
    x, y, w = _design(rows, names)
    policy = LogisticPolicy.fit(x, y, names, use, best, sample_weight=w)
    picks = {
        "policy": [decide(policy, r) for r in rows],
        "policy_cv": cv[best],
        # Each domain decided by a policy fitted on the others: a domain it never saw.
        "policy_other_domains": cross_validated(rows, names, use, best, by_domain=True),
    }
    if set(READER_FEATURES) < set(names):
        # Without the generator's features: what the generator adds over a calibrated reader.
        picks["reader_features_cv"] = cross_validated(rows, READER_FEATURES, use, best)
    policy.fit_report = {
        "data": collected["data"],
        "split": collected["split"],
        "domains": collected["domains"],
        "questions": len(rows),
        "candidates": len(x),
        "settings": collected["settings"],
        "s_per_question": collected["s_per_question"],
        "stage_ms_median": collected["stage_ms_median"],
        "answerable_share": shares or "as in the split",
        "l2_cv_f1": cv_f1,
        "f1": figures(rows, picks),
        "f1_unweighted": figures(rows, picks, weighted=False),
        "metric": "SQuAD 2.0 official F1 (qaserve.metrics.squad_em_f1)",
    }
    return policy


def apply_policies(collected: dict[str, Any], policies: Sequence[Path]) -> dict[str, Any]:
    """Each saved policy's decisions on the collected split, unweighted (its own share)."""
    rows = collected["rows"]
    picks = {}
    for path in policies:
        policy = LogisticPolicy.load(path)
        if policy.generator_use != collected["generator_use"]:
            raise SystemExit(f"{path}: fitted for {policy.generator_use!r} features")
        picks[path.stem] = [decide(policy, r) for r in rows]
    return {
        "data": collected["data"],
        "split": collected["split"],
        "questions": len(rows),
        "settings": collected["settings"],
        "s_per_question": collected["s_per_question"],
        "stage_ms_median": collected["stage_ms_median"],
        "policies": {p.stem: str(p) for p in policies},
        "f1": figures(rows, picks, weighted=False),
        "no_answer_rate": no_answer_rates(rows, picks),
        "metric": "SQuAD 2.0 official F1 (qaserve.metrics.squad_em_f1)",
    }


COLUMNS = {
    "policy": "policy",
    "policy_cv": "cv",
    "policy_other_domains": "other-dom",
    "reader_features_cv": "cv-reader",
    "reader": "reader",
    "always_no_answer": "no-ans",
    "oracle": "oracle",
}
LEGEND = (
    "cv: 5-fold over questions; other-dom: each domain by a policy fitted on the others; "
    "cv-reader: 5-fold, the reader's features only (no generator); reader: the extractive "
    "pipeline; no-ans: always 'no answer'; oracle: the best candidate"
)


def print_figures(f1: dict[str, Any], columns: dict[str, str]) -> None:
    """One row per domain; each column as wide as its label (policy names can be long)."""
    widths = [max(10, len(c)) + 1 for c in columns.values()]
    print(
        f"{'domain':<14}{'n':>5}"
        + "".join(f"{c:>{w}}" for c, w in zip(columns.values(), widths, strict=True))
    )
    for name, fig in f1.items():
        cells = [fig.get(k, float("nan")) for k in columns]
        print(
            f"{name:<14}{fig['n']:>5}"
            + "".join(f"{c:>{w}.4f}" for c, w in zip(cells, widths, strict=True))
        )


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
    p.add_argument(
        "--answerable-share",
        choices=["train", "split"],
        default="train",
        help="weigh each domain's questions to its train split's answerable share (default) "
        "or fit on the split as it is",
    )
    p.add_argument(
        "--reader-features-only",
        action="store_true",
        help="fit on the reader's features alone (an ablation: what the generator adds)",
    )
    p.add_argument(
        "--apply",
        type=Path,
        nargs="+",
        default=None,
        metavar="POLICY",
        help="fit nothing: report these saved policies on --split (--output: the report)",
    )
    add_settings(p, "ensemble.score_documents=3")
    p.add_argument("--quiet", action="store_true")


def _collected(args: argparse.Namespace) -> dict[str, Any]:
    if args.features is not None:
        collected: dict[str, Any] = json.loads(args.features.read_text())
        if collected.get("kind") != FEATURES_FORMAT:
            raise SystemExit(f"{args.features}: not a features file of fit-ensemble")
        return collected
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
    return collected


def _cmd(args: argparse.Namespace) -> int:
    collected = _collected(args)
    if args.apply:
        report = apply_policies(collected, args.apply)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{report['split']}: {report['questions']} questions -> {args.output}")
        columns = {**{name: name for name in report["policies"]}, **COLUMNS}
        print_figures(report["f1"], {k: v for k, v in columns.items() if k in report["f1"]["all"]})
        print("how often each says 'no answer', and the share of questions without a gold span:")
        rates = report["no_answer_rate"]
        print_figures(
            rates,
            {k: v for k, v in columns.items() if k in rates["all"]}
            | {"unanswerable": "unanswerable"},
        )
        return 0
    shares = None
    if args.answerable_share == "train":
        data = Path(collected["data"])
        target = answerable_shares(data, "train", collected["domains"])
        shares = reweigh(collected["rows"], target)
    names = READER_FEATURES if args.reader_features_only else None
    policy = fit_policy(collected, names=names, shares=shares)
    policy.save(args.output)
    report = policy.fit_report
    print(f"policy: {args.output} (l2 {policy.l2:g}, {report['questions']} questions)")
    if shares:
        print(
            "questions weighed to the train splits' answerable share: "
            + ", ".join(f"{d} {v['fitted_on']:.2f}->{v['target']:.2f}" for d, v in shares.items())
        )
    print_figures(report["f1"], {k: v for k, v in COLUMNS.items() if k in report["f1"]["all"]})
    print(LEGEND)
    weights = sorted(zip(policy.features, policy.weights, strict=True), key=lambda w: -abs(w[1]))
    print("weights (standardised):", ", ".join(f"{n} {w:+.2f}" for n, w in weights))
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
