"""A real multi-node Ray cluster on this machine (ray.cluster_utils), the graph deployed onto it
with `qaserve deploy` over the dashboard (as `serve deploy` does), stages pinned to nodes by
custom resources, the store in qdrant-client's local mode (standing in for a Qdrant server:
the same client, the same calls), driven through the SDK; `qaserve status` names the nodes;
then the node holding the Reader is SIGKILLed under a trickle of queries.

One cluster for the module: head (Ingress, Embedder, Generator), a store node
(Retriever), a reader node (Reader); a spare reader node joins before the kill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
# The same documents as the single-node graph tests.
from test_graph import DOCS  # noqa: E402


@dataclass
class Deployed:
    lc: Any  # qaserve.runtime.cluster.LocalCluster
    url: str
    nodes: dict[str, str]  # node name -> node id
    qdrant: Path  # qdrant-client local-mode folder


def _qaserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qaserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def deployed(
    tiny_engine_config: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    from cluster_harness import DRILL_PLACEMENT, LocalCluster, pinned_stages

    from qaserve.modelstore import publish
    from qaserve.runtime.cluster import wait_running
    from qaserve.runtime.server import free_port

    work = tmp_path_factory.mktemp("cluster")
    engine = tiny_engine_config.model_dump(mode="json") | {
        "data_dir": str(work / "data"),
        "cache_dir": str(work / "node-cache"),
        "store": {"url": f"path:{work / 'qdrant'}", "shard_number": 2, "replication_factor": 1},
        # The reader reaches its node through the model store, by content hash.
        "model_store": f"file://{work / 'models'}",
    }
    engine["reader"]["model"] = publish(tiny_engine_config.reader.model, str(work / "models"))
    graph = work / "graph.yaml"
    graph.write_text(yaml.safe_dump({"engine": engine, "stages": pinned_stages(DRILL_PLACEMENT)}))
    lc = LocalCluster({"qaserve_cpu": 100}, num_cpus=2)
    try:
        assert lc.cluster.head_node is not None
        nodes = {"head": str(lc.cluster.head_node.node_id)}
        nodes["store"] = lc.add("store", {"qaserve_store": 100})
        nodes["reader-a"] = lc.add("reader-a", {"qaserve_reader": 100})
        lc.wait_dashboard()
        port = free_port()
        out = _qaserve(
            "deploy",
            "--address",
            lc.dashboard_url,
            "--config",
            str(graph),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--proxy-location",
            "HeadOnly",
        )
        assert out.returncode == 0, out.stderr[-3000:]
        wait_running(lc.dashboard_url)
        yield Deployed(lc, f"http://127.0.0.1:{port}", nodes, work / "qdrant")
    finally:
        lc.shutdown()


def test_status_names_the_nodes_each_stage_was_pinned_to(deployed: Deployed) -> None:
    from cluster_harness import DRILL_PLACEMENT

    out = _qaserve("status", "--address", deployed.lc.dashboard_url, "--json")
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    rows = json.loads(out.stdout)
    where = {r["stage"]: r["node_id"] for r in rows}
    assert set(where) == set(DRILL_PLACEMENT)
    node_of = {"qaserve_cpu": "head", "qaserve_store": "store", "qaserve_reader": "reader-a"}
    for stage, resource in DRILL_PLACEMENT.items():
        assert where[stage] == deployed.nodes[node_of[resource]], (stage, rows)
    assert all(r["state"] == "RUNNING" and r["stage_status"] == "HEALTHY" for r in rows)
    text = _qaserve("status", "--address", deployed.lc.dashboard_url)
    assert text.returncode == 0 and "qaserve_reader" in text.stdout, text.stdout


def test_replicas_run_the_uploaded_packages(deployed: Deployed) -> None:
    """The deploy shipped qaserve as the app's working_dir, not the test machine's install."""
    from qaserve.runtime.cluster import serve_details

    details, _ = serve_details(deployed.lc.dashboard_url)
    app = details["applications"]["qaserve"]
    runtime_env = app["deployed_app_config"]["runtime_env"]
    assert runtime_env["working_dir"].startswith("gcs://_ray_pkg_"), runtime_env
    assert "graph" in app["deployed_app_config"]["args"]


def test_the_sdk_through_the_cluster_with_qdrant_client_mode(deployed: Deployed) -> None:
    from qaserve_client.client import Client

    with Client(deployed.url, timeout=120) as client:
        assert client.ready().ready
        assert client.ingest(DOCS).ids == ["r1", "r2", "r3"]
        assert client.get_document("r2").text == DOCS[1]["text"]
        hits = client.retrieve("How long does the battery last?", top_k=2, filters={"item_id": "A"})
        assert hits.documents[0].id == "r2"
        assert all(d.meta["item_id"] == "A" for d in hits.documents)
        resp = client.query(
            "How is the sound?", mode="ensemble", filters={"item_id": "A"}, max_new_tokens=4
        )
        assert resp.documents and resp.generated is not None
        stores = [m for m in client.models() if m.stage == "store"]
        assert [m.format for m in stores] == ["qdrant-client"], stores
    # The Retriever on the store node wrote through qdrant-client (local mode on disk here).
    assert (deployed.qdrant / "collection" / "documents").is_dir()
    # The Reader replica fetched its model from the store into the node's cache, verified.
    fetched = list((deployed.qdrant.parent / "node-cache" / "models").glob("*/qaserve-model.json"))
    assert len(fetched) == 1, fetched


def test_losing_the_reader_node_costs_a_bounded_window_and_no_documents(deployed: Deployed) -> None:
    from cluster_harness import node_loss

    from qaserve.runtime.cluster import replica_rows, serve_details
    from qaserve_client.client import Client

    with Client(deployed.url, timeout=120) as client:
        client.ingest(DOCS)
    r = node_loss(
        deployed.lc,
        deployed.url,
        "reader-a",
        ("reader-b", {"qaserve_reader": 100}),
        [d["id"] for d in DOCS],
        settle_s=5,
        timeout_s=240,
    )
    print(f"node loss: {json.dumps(r)}")
    assert r["moved_to_spare"], r
    assert r["docs_after"] == r["docs_before"] == len(DOCS), r
    # Bounded: failures and stalls end, and end well before the test's patience runs out.
    assert r["window_s"] < 90 and r["recovered_s"] < 120, r
    assert r["requests"] > r["errors"], r
    # Failed queries are answered as 503 (retryable) or 504 (a stage timed out), never as a
    # 500 nor a dropped connection.
    assert set(r["codes"]) <= {"200", "503", "504"}, r
    rows = replica_rows(*serve_details(deployed.lc.dashboard_url))
    reader = [row for row in rows if row.stage == "Reader"]
    assert reader and all(row.node_kind == "qaserve_reader" for row in reader), rows
    assert all(row.node_id != deployed.nodes["reader-a"] for row in reader), rows


def test_redeploy_through_ray_client_applies_the_new_config(deployed: Deployed) -> None:
    """`qaserve deploy --address ray://...` (Ray Client + serve.run) updates the running app:
    two Ingress replicas now, reported by `qaserve status` over Ray Client too."""
    from cluster_harness import DRILL_PLACEMENT, pinned_stages

    from qaserve_client.client import Client

    graph = yaml.safe_load((deployed.qdrant.parent / "graph.yaml").read_text())
    graph["stages"] = pinned_stages(DRILL_PLACEMENT)
    graph["stages"]["Ingress"]["num_replicas"] = 2
    path = deployed.qdrant.parent / "graph-2.yaml"
    path.write_text(yaml.safe_dump(graph))
    port = deployed.url.rsplit(":", 1)[1]
    args = ["--address", deployed.lc.client_address]
    http = ["--port", port, "--host", "127.0.0.1", "--proxy-location", "HeadOnly"]
    out = _qaserve("deploy", *args, "--config", str(path), *http)
    assert out.returncode == 0, out.stderr[-3000:]
    status = _qaserve("status", *args, "--json")
    assert status.returncode == 0, status.stdout + status.stderr[-2000:]
    rows = json.loads(status.stdout)
    assert sum(r["stage"] == "Ingress" and r["state"] == "RUNNING" for r in rows) == 2, rows
    with Client(deployed.url, timeout=120) as client:
        assert client.get_document("r1").text == DOCS[0]["text"]
        assert client.query("How is the sound?", mode="extractive").documents
