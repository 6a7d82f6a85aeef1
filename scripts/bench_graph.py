"""Per-request overhead of the Ray Serve graph against the in-process engine, and what dynamic
batching buys, on the same questions in one run.

    python scripts/bench_graph.py --questions 40 --concurrency 8 [--mode extractive]

1. in-process: Engine.query for each question (sequential), median and p95;
2. the graph over HTTP (SDK), sequential: the same questions -> overhead = graph - engine;
3. the graph under `--concurrency` parallel clients, with the Reader/Embedder batching as
   configured, then redeployed with batching off (max_batch_size 1): throughput of each.
Prints a table and writes JSON (runs/bench/graph.json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--mode", default="extractive")
    ap.add_argument("--output", type=Path, default=Path("runs/bench/graph.json"))
    args = ap.parse_args()

    import ray
    from ray import serve

    from qaserve.config import EngineConfig
    from qaserve.engine import Engine
    from qaserve.graph import APP_NAME, BatchOptions, GraphConfig, build_graph
    from qaserve.loaders import sample_documents
    from qaserve.server import CONFIG_DIR
    from qaserve_client.client import Client
    from qaserve_client.schema import QueryRequest

    docs = sample_documents()
    items = sorted({d.meta["item_id"] for d in docs})
    stems = [
        "How is the sound quality?",
        "How long does the battery last?",
        "Is it worth the price?",
        "How is the build quality?",
        "Is it easy to set up?",
    ]
    questions = [(stems[i % len(stems)], items[i % len(items)]) for i in range(args.questions)]
    data = Path(tempfile.mkdtemp(prefix="qaserve-bench-"))
    result: dict = {"questions": len(questions), "mode": args.mode, "concurrency": args.concurrency}

    # 1. In-process engine (one process, all cores).
    engine = Engine(EngineConfig.load(None, data_dir=data / "engine"))
    engine.ingest(docs)
    req = [QueryRequest(question=q, filters={"item_id": it}, mode=args.mode) for q, it in questions]
    engine.query(req[0])  # warm-up
    lat = []
    for r in req:
        t = time.perf_counter()
        engine.query(r)
        lat.append((time.perf_counter() - t) * 1000)
    result["engine_ms"] = {"median": statistics.median(lat), "p95": pct(lat, 0.95)}
    engine.close()
    del engine

    # 2./3. The graph.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cfg = GraphConfig.load(CONFIG_DIR / "local.yaml", data_dir=data / "graph")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t = time.perf_counter()
        serve.run(build_graph(cfg), name=APP_NAME, route_prefix="/")
        result["graph_deploy_s"] = time.perf_counter() - t
        with Client(url, timeout=300) as client:
            client.ingest([d.model_dump() for d in docs])

            def ask(q: tuple[str, str]) -> float:
                t = time.perf_counter()
                client.query(q[0], filters={"item_id": q[1]}, mode=args.mode)
                return (time.perf_counter() - t) * 1000

            ask(questions[0])
            lat = [ask(q) for q in questions]
            result["graph_ms"] = {"median": statistics.median(lat), "p95": pct(lat, 0.95)}

            def throughput() -> float:
                t = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    list(pool.map(ask, questions))
                return len(questions) / (time.perf_counter() - t)

            result["graph_qps_batched"] = throughput()
            result["batching"] = {k: v.model_dump() for k, v in cfg.batching.items()}
            off = cfg.model_copy(
                update={"batching": {k: BatchOptions(max_batch_size=1) for k in cfg.batching}}
            )
            serve.run(build_graph(off), name=APP_NAME, route_prefix="/")
            ask(questions[0])
            result["graph_qps_unbatched"] = throughput()
    finally:
        serve.shutdown()
        ray.shutdown()

    e, g = result["engine_ms"], result["graph_ms"]
    result["overhead_ms_median"] = g["median"] - e["median"]
    print(f"{'':28}{'median ms':>12}{'p95 ms':>10}")
    print(f"{'in-process engine':28}{e['median']:>12.1f}{e['p95']:>10.1f}")
    print(f"{'graph over HTTP':28}{g['median']:>12.1f}{g['p95']:>10.1f}")
    print(f"overhead of the graph: {result['overhead_ms_median']:.1f} ms per request (median)")
    print(
        f"throughput at concurrency {args.concurrency}: "
        f"batched {result['graph_qps_batched']:.2f} q/s, "
        f"unbatched {result['graph_qps_unbatched']:.2f} q/s "
        f"(x{result['graph_qps_batched'] / result['graph_qps_unbatched']:.2f})"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
