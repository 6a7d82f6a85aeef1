"""The Ray Serve graph against the in-process engine on the same questions, in one run.

    flock /tmp/qaserve-measure.lock .venv/bin/python scripts/bench_graph.py \
        --questions 40 --concurrency 8 [--mode extractive] [--compare-batching]

1. in-process: Engine.query for each question, one at a time: median, p95, questions/s;
2. the graph over HTTP (SDK), one client: median and p95 -> latency ratio graph / engine;
3. the graph under `--concurrency` parallel clients: questions/s -> throughput ratio
   graph / engine (the engine answering one at a time on the same cores);
4. with --compare-batching, the graph redeployed with batching off (max_batch_size 1).
Prints a table with the ratios and writes JSON (runs/bench/graph.json).
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
    ap.add_argument("--config", default="local.yaml", help="graph YAML (default local.yaml)")
    ap.add_argument("--compare-batching", action="store_true")
    args = ap.parse_args()

    import ray
    from ray import serve

    from qaserve.config import EngineConfig
    from qaserve.loaders import sample_documents
    from qaserve.runtime.graph import build_graph
    from qaserve.runtime.graph_config import APP_NAME, BatchOptions, GraphConfig
    from qaserve.runtime.local import Engine
    from qaserve.runtime.server import resolve_config
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
    t0 = time.perf_counter()
    for r in req:
        t = time.perf_counter()
        engine.query(r)
        lat.append((time.perf_counter() - t) * 1000)
    result["engine_qps"] = len(req) / (time.perf_counter() - t0)
    result["engine_ms"] = {"median": statistics.median(lat), "p95": pct(lat, 0.95)}
    engine.close()
    del engine

    # 2./3. The graph.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cfg = GraphConfig.load(resolve_config(args.config), data_dir=data / "graph")
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

            throughput()  # warm-up: autoscaled stages reach their load-time replica counts
            result["graph_qps"] = throughput()
            result["batching"] = {k: v.model_dump() for k, v in cfg.batching.items()}
            if args.compare_batching:
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
    result["latency_ratio"] = g["median"] / e["median"]
    result["throughput_ratio"] = result["graph_qps"] / result["engine_qps"]
    print(f"{'':34}{'median ms':>10}{'p95 ms':>9}{'q/s':>8}")
    print(f"{'in-process engine, sequential':34}{e['median']:>10.1f}{e['p95']:>9.1f}", end="")
    print(f"{result['engine_qps']:>8.2f}")
    print(f"{'graph over HTTP, 1 client':34}{g['median']:>10.1f}{g['p95']:>9.1f}")
    print(f"{f'graph over HTTP, {args.concurrency} clients':34}{'':>19}{result['graph_qps']:>8.2f}")
    print(
        f"latency ratio graph / engine (median, 1 client): {result['latency_ratio']:.2f} "
        f"(+{result['overhead_ms_median']:.1f} ms)"
    )
    print(
        f"throughput ratio graph ({args.concurrency} clients) / engine (sequential): "
        f"{result['throughput_ratio']:.2f}"
    )
    if "graph_qps_unbatched" in result:
        print(f"batching off: {result['graph_qps_unbatched']:.2f} q/s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
