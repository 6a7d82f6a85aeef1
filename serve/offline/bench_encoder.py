"""`qaserve bench encoder`: the retriever's encoder on torch, ONNX fp32 and ONNX int8, in one
process: passages/s on a thread budget and retrieval quality on a SubjQA domain.

Quality follows the book's protocol at the review level: every unique review of the loaded
splits is embedded whole (truncated to the encoder's window), each question of `--split`
ranks its own item's reviews by cosine. Strict recall@k counts the question's own review;
book-style recall@k counts any review holding a gold span (a no-answer question counts as
found once anything is ranked). The random ranking of the item's reviews is the baseline.

    flock /tmp/qaserve-measure.lock qaserve bench encoder --data SubjQA/electronics --split dev
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.offline.command import Command
from qaserve.offline.protocol import load_domain, random_rankings, recall_table

RUNTIMES = ("torch", "onnx-fp32", "onnx-int8")
KS = (1, 3, 5)


def _ranked(
    vectors: dict[str, np.ndarray], question: np.ndarray, candidates: list[str]
) -> list[str]:
    scores = [float(vectors[c] @ question) for c in candidates]
    return [c for _, c in sorted(zip(scores, candidates, strict=True), key=lambda x: -x[0])]


def bench_encoder(
    data: Path,
    split: str,
    runtimes: list[str],
    threads: int,
    cache_dir: Path,
    limit: int | None = None,
    speed_passages: int = 256,
    log: Any = print,
) -> dict[str, Any]:
    from qaserve.config import EmbedderConfig, EngineConfig
    from qaserve.deployments.retriever import build_embedder
    from qaserve.offline.bench import machine_info

    domain = load_domain(data, split, limit)
    questions, reviews, texts, by_item = (
        domain.questions,
        domain.reviews,
        domain.texts,
        domain.by_item,
    )
    report: dict[str, Any] = {
        "machine": machine_info(threads),
        "data": str(data),
        "split": split,
        "questions": len(questions),
        "reviews": len(reviews),
        "random": recall_table(random_rankings(domain), questions, texts, KS),
        "runtimes": {},
    }
    sample = [texts[i] for i in list(texts)[:speed_passages]]
    for runtime in runtimes:
        cfg = EngineConfig(cache_dir=cache_dir, embedder=EmbedderConfig(runtime=runtime))
        t0 = time.perf_counter()
        embedder = build_embedder(cfg, threads, {})
        load_s = time.perf_counter() - t0
        embedder.embed(sample[:8])  # warm-up
        t0 = time.perf_counter()
        embedder.embed(sample)
        speed = len(sample) / (time.perf_counter() - t0)
        ids = list(texts)
        vectors = dict(zip(ids, embedder.embed([texts[i] for i in ids]), strict=True))
        qvec = embedder.embed([ex.question for ex in questions])
        ranked = {
            ex.id: _ranked(vectors, q, by_item[ex.item_id])
            for ex, q in zip(questions, qvec, strict=True)
        }
        info = embedder.info()
        row = {
            "passages_per_s": round(speed, 1),
            "load_s": round(load_s, 1),
            "size_mb": info.size_mb,
            "format": info.format,
            **recall_table(ranked, questions, texts, KS),
        }
        report["runtimes"][runtime] = row
        log(f"{runtime}: {row}")
    base = report["runtimes"].get("torch")
    if base:
        for row in report["runtimes"].values():
            row["speedup"] = round(row["passages_per_s"] / base["passages_per_s"], 2)
    return report


def format_table(report: dict[str, Any]) -> str:
    cols = [
        "passages_per_s",
        "speedup",
        "size_mb",
        *[f"strict@{k}" for k in KS],
        "book@1",
        "book@3",
    ]
    lines = [f"{'runtime':<10} " + " ".join(f"{c:>14}" for c in cols)]
    rows = [*report["runtimes"].items(), ("random", report["random"])]
    for name, row in rows:
        lines.append(f"{name:<10} " + " ".join(f"{row.get(c, '')!s:>14}" for c in cols))
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    import tempfile

    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        print(f"unknown runtimes {unknown}; expected some of {RUNTIMES}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        report = bench_encoder(
            args.data,
            args.split,
            runtimes,
            args.threads,
            args.cache_dir or Path(tmp),
            args.limit,
            args.speed_passages,
            log=lambda m: print(m, file=sys.stderr),
        )
    print(format_table(report))
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / "encoder.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="SubjQA domain folder or a CSV")
    p.add_argument("--split", default="dev", help="questions from this split (default dev)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated subset")
    p.add_argument("--threads", type=int, default=1, help="threads per runtime (default 1)")
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--speed-passages", type=int, default=256, help="reviews timed for speed")
    p.add_argument("--cache-dir", type=Path, default=None, help="ONNX export cache (default temp)")
    p.add_argument("--output", type=Path, default=Path("runs/bench"), help="folder for the JSON")


COMMAND = Command(
    name="encoder",
    help="the retriever's encoder on torch and ONNX (fp32, int8): speed and recall",
    add_args=_add_args,
    run=_cmd,
    module="qaserve.offline.bench_encoder",
    doc=__doc__,
    doc_in_cli=True,
)
register = COMMAND.register
main = COMMAND.main

if __name__ == "__main__":
    raise SystemExit(main())
