"""Lose the node that holds the Reader, under a steady trickle of queries, and measure it.

A real multi-node Ray cluster on this machine (ray.cluster_utils: a head with the Ingress,
Embedder and Generator, a store node with the Retriever over qdrant-client's local
mode, a reader node), the graph deployed with `qaserve deploy` over the dashboard, the
packaged models, the sample corpus ingested. Then a spare reader node joins, the reader node
is SIGKILLed, and this prints the failure window (kill -> last failed query), the error
count and status codes, the queries that stalled (over 1 s) instead of failing, when the
Reader ran again on the spare node, recovery (the last failed or stalled query finished),
and the documents readable before and after.

    flock /tmp/qaserve-measure.lock .venv/bin/python scripts/node_loss.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # cluster_harness

import yaml


def graph_yaml(folder: Path, engine: dict) -> Path:
    """Each stage pinned to a node kind by a custom resource; small CPU grants (2 cores)."""
    from cluster_harness import DRILL_PLACEMENT, pinned_stages

    path = folder / "graph.yaml"
    path.write_text(yaml.safe_dump({"engine": engine, "stages": pinned_stages(DRILL_PLACEMENT)}))
    return path


def one_run(workdir: Path, engine: dict, interval_s: float, settle_s: float) -> dict:
    from cluster_harness import LocalCluster, node_loss

    from qaserve.loaders import sample_documents
    from qaserve.runtime.cluster import deploy, wait_running
    from qaserve_client.client import Client

    lc = LocalCluster({"qaserve_cpu": 100}, num_cpus=2)
    try:
        lc.add("store", {"qaserve_store": 100})
        lc.add("reader-a", {"qaserve_reader": 100})
        lc.wait_dashboard()
        from qaserve.runtime.server import free_port

        port = free_port()
        t0 = time.monotonic()
        deploy(
            lc.dashboard_url,
            graph_yaml(workdir, engine),
            host="127.0.0.1",
            port=port,
            proxy_location="HeadOnly",
        )
        wait_running(lc.dashboard_url)
        ready_s = time.monotonic() - t0
        url = f"http://127.0.0.1:{port}"
        docs = sample_documents()
        with Client(url, timeout=300) as client:
            ids = client.ingest(docs).ids
        result = node_loss(
            lc,
            url,
            "reader-a",
            ("reader-b", {"qaserve_reader": 100}),
            ids,
            interval_s=interval_s,
            settle_s=settle_s,
        )
        result["deploy_to_healthy_s"] = round(ready_s, 1)
        return result
    finally:
        lc.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--interval", type=float, default=0.25, help="seconds between queries")
    p.add_argument("--settle", type=float, default=10.0, help="quiet seconds that end a run")
    p.add_argument("--json", type=Path, default=None, help="write the runs here")
    args = p.parse_args()
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="qaserve-node-loss-") as tmp:
            work = Path(tmp)
            engine = {
                "data_dir": str(work / "data"),
                "store": {"url": f"path:{work / 'qdrant'}"},
            }
            r = one_run(work, engine, args.interval, args.settle)
        results.append(r)
        print(f"run {i + 1}: {json.dumps(r)}", flush=True)
    if len(results) > 1:
        for key in ("window_s", "errors", "stalled", "recovered_s", "replica_running_again_s"):
            vals = [r[key] for r in results if r[key] is not None]
            if vals:
                print(f"{key}: median {statistics.median(vals)} (min {min(vals)}, max {max(vals)})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = all(r["docs_after"] == r["docs_before"] and r["moved_to_spare"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
