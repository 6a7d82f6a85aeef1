"""Autoscaling shown, not assumed: load one stage, watch its replica count rise, then fall.

`qaserve autoscale-demo` deploys the graph with the Reader on an aggressive autoscaling
config (short delays), drives concurrent reads through its DeploymentHandle, and prints the
replica count once a second while the load runs and after it stops.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any, cast

from qaserve.offline.command import Command
from qaserve.runtime.graph_config import GraphConfig, StageOptions

DEMO_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 2,
    "downscale_delay_s": 6,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
}
TEXT = (
    "The sound quality is excellent and the bass is deep. Battery life is about twelve hours "
    "on a single charge, and the headband is comfortable for long sessions. "
) * 40  # several 384-token windows: each read keeps its replica busy


DEMO_APP = "qaserve-autoscale"


def replica_count(stage: str, app: str = DEMO_APP) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[stage]
    states = cast("dict[str, int]", status.replica_states)  # ReplicaState is a str enum
    return int(states.get("RUNNING", 0))


def run_demo(
    cfg: GraphConfig,
    stage: str = "Reader",
    load_s: float = 40.0,
    cool_s: float = 40.0,
    concurrency: int = 8,
    printer: Any = print,
    app_name: str = DEMO_APP,
    url: str = "http://127.0.0.1:8000",
) -> list[tuple[float, str, int]]:
    """Deploy, load, cool down; returns (seconds, phase, running replicas) samples.

    Needs a Ray instance (ray.init) already started by the caller. The demo runs as its own
    application (its own route prefix); give it its own data dir if another app owns the
    embedded store.
    """
    from ray import serve

    from qaserve.runtime.graph import build_graph
    from qaserve_client.schema import ReadDocument, ReadRequest

    stages = dict(cfg.stages)
    stages[stage] = StageOptions(
        autoscaling_config=DEMO_AUTOSCALING,
        ray_actor_options=cfg.stages[stage].ray_actor_options,
        max_ongoing_requests=4,
    )
    cfg = cfg.model_copy(update={"stages": stages})
    serve.run(build_graph(cfg), name=app_name, route_prefix=f"/{app_name}")
    import httpx

    # Through HTTP, as users drive it: the Ingress replica's handle reports the load.
    endpoint = f"{url}/{app_name}/v1/read"
    request = ReadRequest(
        question="How long does the battery last?", documents=[ReadDocument(id="d", text=TEXT)]
    ).model_dump()
    stop = threading.Event()
    served, failed = [0], [0]

    def worker() -> None:
        http = httpx.Client(timeout=60)
        while not stop.is_set():
            try:
                http.post(endpoint, json=request).raise_for_status()
                served[0] += 1
            except Exception as exc:  # keep the load on; report the failures
                failed[0] += 1
                if failed[0] <= 3:
                    printer(f"read failed: {type(exc).__name__}: {exc}")
                time.sleep(0.2)

    samples: list[tuple[float, str, int]] = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    try:
        while (elapsed := time.monotonic() - t0) < load_s:
            samples.append((elapsed, "load", replica_count(stage, app_name)))
            printer(
                f"{elapsed:5.1f}s  load  {stage} replicas={samples[-1][2]}  "
                f"served={served[0]} failed={failed[0]}"
            )
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    printer(f"load stopped after {served[0]} reads ({failed[0]} failed)")
    t1 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < load_s + cool_s:
        samples.append((elapsed, "idle", replica_count(stage, app_name)))
        printer(f"{elapsed:5.1f}s  idle  {stage} replicas={samples[-1][2]}")
        if samples[-1][2] == 1 and time.monotonic() - t1 > 3 and max(s[2] for s in samples) > 1:
            break
        time.sleep(1)
    serve.delete(app_name)
    return samples


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="local.yaml")
    p.add_argument("--load-s", type=float, default=40.0)
    p.add_argument("--cool-s", type=float, default=40.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the demo's Serve proxy")


def _cmd(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from qaserve.runtime.server import resolve_config

    cfg = GraphConfig.load(resolve_config(args.config))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        samples = run_demo(
            cfg,
            load_s=args.load_s,
            cool_s=args.cool_s,
            concurrency=args.concurrency,
            url=f"http://127.0.0.1:{args.port}",
        )
    finally:
        serve.shutdown()
        ray.shutdown()
    peak = max(s[2] for s in samples)
    final = samples[-1][2]
    print(f"peak replicas {peak}, after the load {final}")
    return 0 if peak > 1 and final < peak else 1


COMMAND = Command(
    "autoscale-demo",
    "load the Reader and watch it scale up, then down",
    _add_args,
    _cmd,
    module="qaserve.offline.autoscale",
    doc=__doc__,
)
register = COMMAND.register
