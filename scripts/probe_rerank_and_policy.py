"""Two measurements behind issue 11's choices, on the book protocol (one domain folder):

1. Re-ranking: all of an item's reviews ranked by the dense score, by BM25, and by the
   reader's span-vs-no-answer log-odds (the reader as a cross-encoder, no training), strict
   and book-style recall@1/@3 beside the chance level.
2. The pipeline's no-answer rule across documents: each review of the item read alone (the
   reader's scores are per window, so reading them together gives the same numbers), then
   for the top k by dense score: "best_document" (the best span against its own review's
   no-answer score), "most_confident" (against the highest no-answer score among the k),
   "mean" (against the mean), with SQuAD 2.0 official F1, beside always "no answer" and the
   reader on the question's own review.

    flock /tmp/qaserve-measure.lock .venv/bin/python scripts/probe_rerank_and_policy.py \
        $SUBJQA/electronics --split dev --cache runs/probe/electronics-dev.json

The rows are cached to --cache (rerun = analysis only). Selection uses dev splits only.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.metrics import squad_em_f1


def collect(data: Path, split: str) -> list[dict[str, Any]]:
    from qaserve.config import EngineConfig
    from qaserve.offline.protocol import load_domain
    from qaserve.runtime.local import Engine
    from qaserve_client.schema import ReadDocument

    domain = load_domain(data, split)
    engine = Engine(EngineConfig.load(None, data_dir=Path(tempfile.mkdtemp())))
    engine.ingest(domain.reviews, collection="probe", progress=False)
    rows, t0 = [], time.perf_counter()
    for i, ex in enumerate(domain.questions):
        flt = {"item_id": ex.item_id}

        def scores(mode: str, ex: Any = ex, flt: dict[str, str] = flt) -> dict[str, float]:
            hits = engine.retriever.retrieve(
                ex.question, top_k=50, filters=flt, collection="probe", mode=mode
            )
            out: dict[str, float] = {}
            for h in hits:  # passages: a review keeps its best
                out[h.id] = max(out.get(h.id, -1e9), h.score)
            return out

        dense, bm25 = scores("dense"), scores("sparse")
        cands = {}
        for c in domain.by_item[ex.item_id]:
            r = engine.reader.read(
                ex.question,
                [ReadDocument(id=c, text=domain.texts[c])],
                top_k=1,
                handle_impossible_answer=True,
            )
            span = [a for a in r.answers if a.answer]
            cands[c] = {
                "dense": dense.get(c),
                "bm25": bm25.get(c),
                "span": span[0].score if span else 0.0,
                "null": r.no_answer_score or 0.0,
                "ans": span[0].answer if span else "",
                "has_gold": any(a.text and a.text in domain.texts[c] for a in ex.answers),
            }
        golds = [a.text for a in ex.answers]
        rows.append({"q": ex.question, "own": ex.review_id, "golds": golds, "cands": cands})
        if i % 50 == 0:
            print(f"{i}/{len(domain.questions)} {time.perf_counter() - t0:.0f} s", flush=True)
    engine.close()
    return rows


def _log(p: float) -> float:
    return math.log(max(p, 1e-12))


def _odds(c: dict[str, Any]) -> float:
    return _log(c["span"]) - _log(c["null"])


def _dense(c: dict[str, Any]) -> float:
    return c["dense"] if c["dense"] is not None else -9.0


def rerank_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    rankers = {
        "dense": _dense,
        "bm25": lambda c: c["bm25"] or 0.0,
        "reader log-odds": _odds,
    }
    out: dict[str, dict[str, float]] = {
        "chance": {"strict@1": float(np.mean([1 / len(r["cands"]) for r in rows]))}
    }
    for name, key in rankers.items():
        fig: dict[str, list[float]] = {}
        for r in rows:
            ids = sorted(r["cands"], key=lambda c: -key(r["cands"][c]))
            answerable = any(r["golds"])
            for k in (1, 3):
                fig.setdefault(f"strict@{k}", []).append(r["own"] in ids[:k])
                found = any(r["cands"][c]["has_gold"] for c in ids[:k])
                fig.setdefault(f"book@{k}", []).append(found if answerable else True)
        out[name] = {k: float(np.mean(v)) for k, v in fig.items()}
    return out


def answer(r: dict[str, Any], k: int, rule: str) -> str:
    top = sorted(r["cands"].values(), key=lambda c: -_dense(c))[:k]
    best = max(top, key=lambda c: c["span"])
    if best["span"] <= 0:
        return ""
    null = {
        "best_document": best["null"],
        "most_confident": max(c["null"] for c in top),
        "mean": float(np.mean([c["null"] for c in top])),
    }[rule]
    return best["ans"] if _log(best["span"]) > _log(null) else ""


def policy_table(rows: list[dict[str, Any]]) -> dict[str, float]:
    def f1(pred: str, r: dict[str, Any]) -> float:
        return squad_em_f1(pred, r["golds"] or [""])[1]

    own = [r["cands"][r["own"]]["ans"] if _odds(r["cands"][r["own"]]) > 0 else "" for r in rows]
    out = {
        "always no answer": float(np.mean([f1("", r) for r in rows])),
        "reader on the own review": float(
            np.mean([f1(p, r) for p, r in zip(own, rows, strict=True)])
        ),
    }
    for rule in ("best_document", "most_confident", "mean"):
        for k in (1, 3, 5, 10):
            out[f"{rule} k={k}"] = float(np.mean([f1(answer(r, k, rule), r) for r in rows]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="a SubjQA domain folder")
    p.add_argument("--split", default="dev")
    p.add_argument("--cache", type=Path, required=True, help="rows JSON (reused when present)")
    args = p.parse_args()
    if args.cache.exists():
        rows = json.loads(args.cache.read_text())
    else:
        rows = collect(args.data, args.split)
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        args.cache.write_text(json.dumps(rows))
    print(f"{len(rows)} questions, {np.mean([len(r['cands']) for r in rows]):.1f} reviews/item")
    for name, fig in rerank_table(rows).items():
        print(f"  {name:<18}" + "  ".join(f"{k} {v:.3f}" for k, v in fig.items()))
    for name, f1 in policy_table(rows).items():
        print(f"  {name:<26} F1 {f1:.3f}")


if __name__ == "__main__":
    main()
