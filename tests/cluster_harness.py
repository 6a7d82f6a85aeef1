"""Test harness for cluster drills: a multi-node Ray cluster on one machine, a steady
trickle of queries, and a node-loss drill that times the outage
(tests/test_cluster.py, scripts/node_loss.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from qaserve.runtime.cluster import replica_rows, serve_details
from qaserve.runtime.server import free_port

# --- a steady trickle of queries, for node-loss drills -------------------------------------------


@dataclass
class Drill:
    """Queries at a fixed rate, open loop (each sent on time on its own thread, whether or not
    earlier ones have returned), no retries: every outcome is kept with its send and finish
    times, so the outage window and the requests that stalled through it can be measured."""

    url: str
    interval_s: float = 0.25
    question: str = "How is the sound?"
    timeout_s: float = 60.0
    results: list[tuple[float, float, int | str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill", daemon=True)

    def start(self) -> Drill:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 10)

    def _run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from qaserve_client.client import Client, Retry
        from qaserve_client.errors import QAServeClientError, QAServeHTTPError

        def one(client: Client) -> None:
            t0 = time.monotonic()
            outcome: int | str
            try:
                client.query(self.question, mode="extractive")
                outcome = 200
            except QAServeHTTPError as exc:
                outcome = exc.status
            except QAServeClientError as exc:
                outcome = type(exc).__name__
            self.results.append((t0, time.monotonic(), outcome))

        with (
            Client(self.url, timeout=self.timeout_s, retry=Retry(attempts=0)) as client,
            ThreadPoolExecutor(64, thread_name_prefix="drill") as pool,
        ):
            next_at = time.monotonic()
            while not self._stop.is_set():
                pool.submit(one, client)
                next_at += self.interval_s
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def summary(self, since: float, stall_s: float = 1.0) -> dict[str, Any]:
        """From `since` (the kill): the failed requests and the window they fall in, the
        requests that stalled (took over `stall_s`), and recovery: when the last failed or
        stalled request finished, after which queries were answered normally again."""
        before = sorted(r[1] - r[0] for r in self.results if r[1] < since)
        after = sorted(r for r in self.results if r[1] >= since)
        failed = [r for r in after if r[2] != 200]
        bad = [r for r in after if r[2] != 200 or r[1] - r[0] > stall_s]
        return {
            "requests": len(after),
            "errors": len(failed),
            "codes": dict(Counter(str(r[2]) for r in after)),
            "first_error_s": round(min(r[1] for r in failed) - since, 2) if failed else None,
            "window_s": round(max(r[1] for r in failed) - since, 2) if failed else 0.0,
            "stalled": sum(r[2] == 200 and r[1] - r[0] > stall_s for r in after),
            "recovered_s": round(max(r[1] for r in bad) - since, 2) if bad else 0.0,
            "p50_before_s": round(before[len(before) // 2], 3) if before else None,
            "slowest_s": round(max((r[1] - r[0] for r in after), default=0.0), 2),
        }


# --- a multi-node cluster on one machine (drills and tests) --------------------------------------


# The drills' placement: each stage pinned to a kind of node by a custom resource.
DRILL_PLACEMENT = {
    "Ingress": "qaserve_cpu",
    "Embedder": "qaserve_cpu",
    "Generator": "qaserve_cpu",
    "Retriever": "qaserve_store",
    "Reader": "qaserve_reader",
}


def pinned_stages(placement: dict[str, str], num_cpus: float = 0.1) -> dict[str, Any]:
    """GraphConfig `stages:` pinning each stage by 0.01 of its node kind's resource."""
    return {
        name: {"ray_actor_options": {"num_cpus": num_cpus, "resources": {res: 0.01}}}
        for name, res in placement.items()
    }


class LocalCluster:
    """Several Ray nodes on this machine (ray.cluster_utils.Cluster), each with its own
    custom resources, a head with the dashboard (for `deploy`/`status` over HTTP); a node
    can be killed without ceremony, as a lost VM would be."""

    def __init__(self, head_resources: dict[str, float], num_cpus: int = 1) -> None:
        from ray.cluster_utils import Cluster

        self.dashboard_port = free_port()
        self.client_port = free_port()
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "gcs_server_port": free_port(),
                "dashboard_agent_listen_port": free_port(),
                "num_cpus": num_cpus,
                "resources": head_resources,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": self.dashboard_port,
                "ray_client_server_port": self.client_port,
            },
        )
        self.nodes: dict[str, Any] = {}

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add(self, name: str, resources: dict[str, float], num_cpus: int = 1) -> str:
        """Start a worker node; returns its node id."""
        node = self.cluster.add_node(num_cpus=num_cpus, resources=resources)
        self.nodes[name] = node
        return str(node.node_id)

    def kill(self, name: str) -> None:
        """SIGKILL the node's raylet, object store and workers (no graceful drain)."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def wait_dashboard(self, timeout_s: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.dashboard_url}/api/version", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no dashboard on {self.dashboard_url}")
            time.sleep(1)

    def shutdown(self) -> None:
        self.cluster.shutdown()


def node_loss(
    lc: LocalCluster,
    url: str,
    victim: str,
    spare: tuple[str, dict[str, float]],
    doc_ids: list[str],
    stage: str = "Reader",
    interval_s: float = 0.25,
    settle_s: float = 10.0,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Kill node `victim` under a trickle of queries, with a `spare` node (name, resources)
    added first for the lost replicas to move to; measure the outage and check the store.

    Ends once `stage` runs again on a live node and queries have succeeded for `settle_s`.
    """
    from qaserve_client.client import Client

    with Client(url, timeout=60) as client:
        before = {i: client.get_document(i).text for i in doc_ids}
    spare_id = lc.add(*spare)
    drill = Drill(url, interval_s=interval_s).start()
    time.sleep(5)  # a steady state before the kill
    victim_id = str(lc.nodes[victim].node_id)
    killed_at = time.monotonic()
    lc.kill(victim)
    moved_at: float | None = None
    moved_to = ""
    try:
        while time.monotonic() - killed_at < timeout_s:
            time.sleep(1)
            if moved_at is None:
                try:
                    rows = replica_rows(*serve_details(lc.dashboard_url))
                except Exception:
                    rows = []
                live = [r for r in rows if r.stage == stage and r.state == "RUNNING"]
                if live and all(r.node_id != victim_id for r in live):
                    moved_at, moved_to = time.monotonic(), live[0].node_id
            done = [r for r in drill.results if r[0] >= killed_at]
            last_fail = max((r[1] for r in done if r[2] != 200), default=killed_at)
            ok_since = [r for r in done if r[0] > last_fail and r[2] == 200]
            if moved_at is not None and ok_since and time.monotonic() - last_fail >= settle_s:
                break
    finally:
        drill.stop()
    with Client(url, timeout=60) as client:
        after = {}
        for i in doc_ids:
            with contextlib.suppress(Exception):  # a lost document counts as not there
                after[i] = client.get_document(i).text
    summary = drill.summary(killed_at)
    summary.update(
        {
            "replica_running_again_s": round(moved_at - killed_at, 2) if moved_at else None,
            "moved_to_spare": moved_to == spare_id,
            "docs_before": len(before),
            "docs_after": sum(after.get(i) == t for i, t in before.items()),
        }
    )
    return summary


# --- the commands ----------------------------------------------------------------------------
