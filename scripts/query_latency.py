"""Extractive query latency on one SubjQA domain (book protocol), in-process: ingest every
review, then time each question's `Engine.query` (item filter, the server's defaults).

Run it against two trees alternately for a side-by-side figure (scripts/latency_paired.sh):
    python scripts/query_latency.py $SUBJQA/electronics --split test --limit 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=200)
    args = p.parse_args()
    from qaserve.config import EngineConfig
    from qaserve.offline.protocol import load_domain
    from qaserve.runtime.local import Engine
    from qaserve_client.schema import QueryRequest

    domain = load_domain(args.data, args.split, args.limit)
    engine = Engine(EngineConfig.load(None, data_dir=Path(tempfile.mkdtemp())))
    engine.ingest(domain.reviews, collection="lat", progress=False)
    times = []
    for ex in domain.questions:
        t = time.perf_counter()
        engine.query(
            QueryRequest(
                question=ex.question,
                filters={"item_id": ex.item_id},
                collection="lat",
                mode="extractive",
            )
        )
        times.append(time.perf_counter() - t)
    engine.close()
    q = statistics.quantiles(times, n=20)
    print(
        json.dumps(
            {
                "n": len(times),
                "p50_ms": round(1000 * statistics.median(times), 1),
                "p95_ms": round(1000 * q[18], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
