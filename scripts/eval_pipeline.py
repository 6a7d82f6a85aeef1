"""The served query pipeline on SubjQA by the book's protocol, scored by SQuAD 2.0's official
rule, with the always-no-answer and random-review baselines beside it.

Protocol: every unique review of the domain from all splits is indexed with its item_id; each
question of `--split` is asked of the pipeline (`Engine.query`: what the server answers, with
the server's defaults) filtered to its item. Scoring: `qaserve.metrics.squad_em_f1` (empty
golds drop out when a question has any span). Baselines: "" for every question; the reader on
one review of the item picked at random (seed 0); the reader on the question's own review.

It imports only what old and new trees share, so a change can be measured before and after:

    flock /tmp/qaserve-measure.lock .venv/bin/python scripts/eval_pipeline.py \\
        ../shared/data/subjqa --domain electronics --split test --out runs/eval/new.json
    PYTHONPATH=/tmp/qaserve-old flock ... (the same, --out runs/eval/old.json)

Interim: `qaserve eval` itself moves to this protocol with issue 11.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "data", type=Path, help="the SubjQA folder holding <domain>/{train,dev,test}.csv"
    )
    ap.add_argument("--domain", default="electronics")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from tqdm.auto import tqdm

    import qaserve
    from qaserve.config import EngineConfig
    from qaserve.metrics import mean, recall_at_k, squad_em_f1
    from qaserve.subjqa import SPLITS, load_subjqa, unique_reviews
    from qaserve_client.schema import QueryRequest, ReadDocument

    try:
        from qaserve.runtime.local import Engine
    except ImportError:  # before the one-pipeline rework
        from qaserve.engine import Engine  # type: ignore[no-redef]  # the old tree's

    folder = args.data / args.domain
    everything = [ex for s in SPLITS for ex in load_subjqa(folder, split=s)]
    questions = load_subjqa(folder, split=args.split)
    reviews = unique_reviews(everything)
    by_item: dict[str, list[Any]] = {}
    for doc in reviews:
        by_item.setdefault(str(doc.meta["item_id"]), []).append(doc)

    engine = Engine(EngineConfig.load(None, data_dir=Path(tempfile.mkdtemp())))
    t0 = time.perf_counter()
    engine.ingest(reviews, progress=True)
    ingest_s = time.perf_counter() - t0

    def top1(question: str, text: str) -> str:
        out = engine.reader.read(
            question, [ReadDocument(text=text)], top_k=1, handle_impossible_answer=True
        )
        return out.answers[0].answer if out.answers else ""

    rng = random.Random(0)
    rows: dict[str, list[tuple[float, float]]] = {
        "pipeline": [],
        "always no answer": [],
        "random review of the item": [],
        "own review (reader alone)": [],
    }
    recall: dict[int, list[float]] = {1: [], 3: []}
    latency = []
    t0 = time.perf_counter()
    for ex in tqdm(questions, desc="questions"):
        golds = ex.gold_texts
        t = time.perf_counter()
        resp = engine.query(
            QueryRequest(question=ex.question, filters={"item_id": ex.item_id}, mode="extractive")
        )
        latency.append((time.perf_counter() - t) * 1000)
        ranked = list(dict.fromkeys(d.id for d in resp.documents))
        for k in recall:
            recall[k].append(recall_at_k(ranked, {ex.review_id}, k))
        rows["pipeline"].append(squad_em_f1(resp.answer.text, golds))
        rows["always no answer"].append(squad_em_f1("", golds))
        other = rng.choice(by_item[ex.item_id])
        rows["random review of the item"].append(squad_em_f1(top1(ex.question, other.text), golds))
        rows["own review (reader alone)"].append(squad_em_f1(top1(ex.question, ex.context), golds))
    engine.close()

    answerable = [any(a for a in ex.gold_texts) for ex in questions]
    report: dict[str, Any] = {
        "code": str(Path(qaserve.__file__).parent),
        "data": str(folder),
        "split": args.split,
        "questions": len(questions),
        "answerable": sum(answerable),
        "reviews_indexed": len(reviews),
        "ingest_s": round(ingest_s, 1),
        "questions_s": round(time.perf_counter() - t0, 1),
        "pipeline_query_ms_median": round(sorted(latency)[len(latency) // 2], 1),
        "strict_recall": {f"@{k}": round(mean(v), 4) for k, v in recall.items()},
        "squad2_official": {},
    }
    print(
        f"{args.domain}/{args.split}: {len(questions)} questions ({sum(answerable)} answerable), "
        f"{len(reviews)} reviews indexed; code {report['code']}"
    )
    print(f"{'':30}{'EM':>7}{'F1':>7}{'F1 answerable':>15}{'F1 unanswerable':>17}")
    for name, scores in rows.items():
        ans = [f for (_, f), a in zip(scores, answerable, strict=True) if a]
        una = [f for (_, f), a in zip(scores, answerable, strict=True) if not a]
        figures = {
            "em": round(mean(e for e, _ in scores), 4),
            "f1": round(mean(f for _, f in scores), 4),
            "f1_answerable": round(mean(ans), 4),
            "f1_unanswerable": round(mean(una), 4),
        }
        report["squad2_official"][name] = figures
        print(
            f"{name:30}{figures['em']:>7.3f}{figures['f1']:>7.3f}"
            f"{figures['f1_answerable']:>15.3f}{figures['f1_unanswerable']:>17.3f}"
        )
    print(
        f"strict recall of the pipeline's documents: {report['strict_recall']}; "
        f"query median {report['pipeline_query_ms_median']} ms"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
