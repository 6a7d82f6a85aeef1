"""The Ray Serve graph against the in-process engine on the same questions, in one run.

    flock /tmp/qaserve-measure.lock .venv/bin/python scripts/bench_graph.py \
        --questions 40 --concurrency 8 [--mode extractive] [--compare-batching] \
        [--set KEY=VALUE ...] [--compare-mode extractive]

Both systems run side by side in this process (the graph on local Ray, the engine
in-process) and are measured in alternating `--rounds`, so a change in the shared machine's
load hits both alike:
1. each question asked of the engine, then of the graph over HTTP (SDK), one client each:
   median and p95 -> latency ratio graph / engine;
2. the engine answering the questions one at a time (questions/s), then the graph under
   `--concurrency` parallel clients -> throughput ratio graph / engine, median of rounds;
3. with --compare-batching, the graph redeployed with batching off (max_batch_size 1);
4. with --compare-mode M, each question also asked of the graph in mode M right after
   `--mode` (e.g. the ensemble against extractive): median and p95 of both, and the ratio.
`--set` overrides the engine config of both systems (e.g. ensemble.generator_use=score).
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
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def medians(timings: list[dict[str, float]]) -> dict[str, float]:
    """Per stage, the median of the timings_ms the answers report."""
    keys = sorted({k for t in timings for k in t})
    return {k: round(statistics.median(t[k] for t in timings if k in t), 1) for k in keys}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--mode", default="extractive")
    ap.add_argument("--output", type=Path, default=Path("runs/bench/graph.json"))
    ap.add_argument("--config", default="local.yaml", help="graph YAML (default local.yaml)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    ap.add_argument("--compare-batching", action="store_true")
    ap.add_argument("--compare-mode", default=None, help="also time the graph in this mode")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)

    import ray
    from ray import serve

    from qaserve.config import EngineConfig
    from qaserve.loaders import sample_documents
    from qaserve.loadtests.profiling import CpuAccount
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

    req = [QueryRequest(question=q, filters={"item_id": it}, mode=args.mode) for q, it in questions]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cfg = GraphConfig.load(resolve_config(args.config), data_dir=data / "graph", **overrides)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    engine = None
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            logging_config=cfg.logging.model_dump(),
        )
        t = time.perf_counter()
        serve.run(build_graph(cfg), name=APP_NAME, route_prefix="/")
        result["graph_deploy_s"] = time.perf_counter() - t
        # Both systems up side by side (the graph idles while the engine answers), measured
        # in alternating rounds so that drift in the shared machine's load hits both alike.
        engine = Engine(EngineConfig.load(None, data_dir=data / "engine", **overrides))
        engine.ingest(docs)
        with Client(url, timeout=300) as client:
            client.ingest([d.model_dump() for d in docs])
            samples: dict[str, list[float]] = {"engine": [], "graph": []}
            other: list[float] = []  # the graph in --compare-mode
            stages: dict[str, list[dict[str, float]]] = {"engine": [], "graph": []}

            def ask_engine(r: QueryRequest, keep: bool = False) -> float:
                t = time.perf_counter()
                timings = engine.query(r).timings_ms
                if keep:
                    stages["engine"].append(timings)
                return (time.perf_counter() - t) * 1000

            def ask_graph(r: QueryRequest, keep: bool = False, mode: str | None = None) -> float:
                t = time.perf_counter()
                resp = client.query(r.question, filters=r.filters, mode=mode or r.mode)
                if keep:
                    stages["graph"].append(resp.timings_ms)
                return (time.perf_counter() - t) * 1000

            def throughput(ask: Any, clients: int) -> float:
                t = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(ask, req))
                return len(req) / (time.perf_counter() - t)

            ask_engine(req[0]), ask_graph(req[0])  # warm-up
            throughput(ask_graph, args.concurrency)  # autoscaled stages reach load-time counts
            rounds: list[dict[str, float]] = []
            cpu_ms: defaultdict[str, list[float]] = defaultdict(list)  # per question, by process
            for i in range(args.rounds):
                for r in req:  # one question each, in turn: 1 client each
                    samples["engine"].append(ask_engine(r, keep=True))
                    samples["graph"].append(ask_graph(r, keep=True))
                    if args.compare_mode:
                        other.append(ask_graph(r, mode=args.compare_mode))
                engine_qps = throughput(ask_engine, 1)
                account = CpuAccount().start()
                graph_qps = throughput(ask_graph, args.concurrency)
                for name, cpu_s in account.stop().items():
                    cpu_ms[name].append(cpu_s * 1000 / len(req))
                rounds.append({"engine_qps": engine_qps, "graph_qps": graph_qps})
                print(
                    f"round {i + 1}/{args.rounds}: engine {engine_qps:.2f} q/s sequential, "
                    f"graph {graph_qps:.2f} q/s at {args.concurrency} clients",
                    file=sys.stderr,
                )
            if args.compare_batching:
                off = cfg.model_copy(
                    update={"batching": {k: BatchOptions(max_batch_size=1) for k in cfg.batching}}
                )
                serve.run(build_graph(off), name=APP_NAME, route_prefix="/")
                ask_graph(req[0])
                result["graph_qps_unbatched"] = throughput(ask_graph, args.concurrency)
    finally:
        if engine is not None:
            engine.close()
        serve.shutdown()
        ray.shutdown()

    for name, lat in samples.items():
        result[f"{name}_ms"] = {"median": statistics.median(lat), "p95": pct(lat, 0.95)}
        result[f"{name}_stage_ms"] = medians(stages[name])
    result["rounds"] = rounds
    result["engine_qps"] = statistics.median(r["engine_qps"] for r in rounds)
    result["graph_qps"] = statistics.median(r["graph_qps"] for r in rounds)
    result["batching"] = {k: v.model_dump() for k, v in cfg.batching.items()}
    e, g = result["engine_ms"], result["graph_ms"]
    if other:
        result["compare_mode"] = args.compare_mode
        result["graph_compare_mode_ms"] = {
            "median": statistics.median(other),
            "p95": pct(other, 0.95),
        }
    result["overhead_ms_median"] = g["median"] - e["median"]
    result["latency_ratio"] = g["median"] / e["median"]
    result["throughput_ratio"] = statistics.median(r["graph_qps"] / r["engine_qps"] for r in rounds)
    print(f"{args.rounds} rounds of {len(req)} questions ({args.mode}), graph config {args.config}")
    print(f"{'':34}{'median ms':>10}{'p95 ms':>9}{'q/s':>8}")
    print(f"{'in-process engine, sequential':34}{e['median']:>10.1f}{e['p95']:>9.1f}", end="")
    print(f"{result['engine_qps']:>8.2f}")
    print(f"{'graph over HTTP, 1 client':34}{g['median']:>10.1f}{g['p95']:>9.1f}")
    print(f"{f'graph over HTTP, {args.concurrency} clients':34}{'':>19}{result['graph_qps']:>8.2f}")
    if other:
        o = result["graph_compare_mode_ms"]
        print(f"{f'graph, {args.compare_mode}, 1 client':34}{o['median']:>10.1f}{o['p95']:>9.1f}")
        print(f"{args.mode} / {args.compare_mode} (graph, median): {g['median'] / o['median']:.2f}")
    print(
        f"latency ratio graph / engine (median, 1 client): {result['latency_ratio']:.2f} "
        f"(+{result['overhead_ms_median']:.1f} ms)"
    )
    print(
        f"throughput ratio graph ({args.concurrency} clients) / engine (sequential), "
        f"median of rounds: {result['throughput_ratio']:.2f}"
    )
    result["graph_cpu_ms_per_question"] = {
        k: round(statistics.median(v), 1) for k, v in cpu_ms.items() if statistics.median(v) >= 0.5
    }
    print(f"CPU ms per question at {args.concurrency} clients, by process (median of rounds):")
    print("  " + ", ".join(f"{k} {v}" for k, v in result["graph_cpu_ms_per_question"].items()))
    print("stage medians at 1 client (ms), engine:", result["engine_stage_ms"])
    print("stage medians at 1 client (ms), graph: ", result["graph_stage_ms"])
    if "graph_qps_unbatched" in result:
        print(f"batching off: {result['graph_qps_unbatched']:.2f} q/s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
