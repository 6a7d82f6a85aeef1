"""Does a fitted ensemble policy help in choosing *which span*, apart from *whether* to answer?

Reads the features `qaserve fit-ensemble` collected (dev and another split) and scores, per
domain: the extractive pipeline; each saved policy gated by the pipeline (the pipeline decides
whether to answer, the policy picks among the span candidates); and a policy fitted on dev's span
candidates alone (5-fold on dev, then fitted on all of dev and applied to the other split).

    python scripts/probe_policy_gating.py runs/dev.features.json runs/test.features.json \\
        runs/policy.json [more policies]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.deployments.ensemble_policy import LogisticPolicy
from qaserve.offline.fit_ensemble import _design, _f1, _groups, cross_validated, decide

SPAN_ONLY = ("span_reader", "span_logodds", "span_rank", "span_doc_prior", "span_doc_rank")
SPAN_GEN = ("span_gen", "span_gen_vs_null", "span_gen_best")


def span_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The questions the pipeline answers, restricted to their span candidates."""
    out = []
    for r in rows:
        if r["reader"] == "" or not r["features"]:
            continue
        idx = [i for i, f in enumerate(r["features"]) if f["span"] == 1.0]
        if idx:
            keep = {k: [r[k][i] for i in idx] for k in ("features", "f1", "texts")}
            out.append({**r, **keep, "orig": idx})
    return out


def score(rows: list[dict[str, Any]], picks: dict[str, int]) -> dict[str, float]:
    """Official F1 per domain: the picked candidate where there is one, else the pipeline's."""
    f1 = [
        _f1(r["reader"], r["golds"]) if (i := picks.get(r["id"])) is None else r["f1"][i]
        for r in rows
    ]
    return {k: round(float(np.mean([f1[i] for i in idx])), 4) for k, idx in _groups(rows).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dev", type=Path)
    ap.add_argument("other", type=Path)
    ap.add_argument("policies", type=Path, nargs="+")
    args = ap.parse_args()
    dev = json.loads(args.dev.read_text())["rows"]
    other = json.loads(args.other.read_text())["rows"]
    for label, rows in (("dev", dev), ("other", other)):
        print(label, "pipeline", score(rows, {}))
    for path in args.policies:
        policy = LogisticPolicy.load(path)
        for label, rows in (("dev", dev), ("other", other)):
            picks = {r["id"]: r["orig"][decide(policy, r)] for r in span_rows(rows)}
            print(label, f"gated {path.stem}", score(rows, picks))
    use = LogisticPolicy.load(args.policies[0]).generator_use
    names = [n for n in (*SPAN_ONLY, *SPAN_GEN) if n in dev[0]["features"][0]]
    spans = span_rows(dev)
    folded = cross_validated(spans, names, use, l2=1.0)
    cv = {r["id"]: r["orig"][pick] for r, pick in zip(spans, folded, strict=True)}
    print("dev", "span-only policy, 5-fold", score(dev, cv))
    x, y, w = _design(spans, names)
    fitted = LogisticPolicy.fit(x, y, names, use, 1.0, sample_weight=w)
    picks = {r["id"]: r["orig"][decide(fitted, r)] for r in span_rows(other)}
    print("other", "span-only policy, fitted on dev", score(other, picks))


if __name__ == "__main__":
    main()
