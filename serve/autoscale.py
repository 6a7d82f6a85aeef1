"""Autoscaling shown, not assumed: load one stage, watch its replica count rise, then fall.

`qaserve autoscale-demo` deploys the graph with the Reader on an aggressive autoscaling
config (short delays), drives concurrent reads through its DeploymentHandle, and prints the
replica count once a second while the load runs and after it stops.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from qaserve.graph import GraphConfig, StageOptions

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
) * 12


DEMO_APP = "qaserve-autoscale"


def replica_count(stage: str, app: str = DEMO_APP) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[stage]
    return int(status.replica_states.get("RUNNING", 0))


def run_demo(
    cfg: GraphConfig,
    stage: str = "Reader",
    load_s: float = 40.0,
    cool_s: float = 40.0,
    concurrency: int = 6,
    printer: Any = print,
    app_name: str = DEMO_APP,
) -> list[tuple[float, str, int]]:
    """Deploy, load, cool down; returns (seconds, phase, running replicas) samples.

    Needs a Ray instance (ray.init) already started by the caller. The demo runs as its own
    application (its own route prefix); give it its own data dir if another app owns the
    embedded store.
    """
    from ray import serve

    from qaserve.graph import build_graph
    from qaserve_client.schema import ReadDocument, ReadRequest

    stages = dict(cfg.stages)
    stages[stage] = StageOptions(
        autoscaling_config=DEMO_AUTOSCALING,
        ray_actor_options=cfg.stages[stage].ray_actor_options,
        max_ongoing_requests=4,
    )
    cfg = cfg.model_copy(update={"stages": stages})
    serve.run(build_graph(cfg), name=app_name, route_prefix=f"/{app_name}")
    reader = serve.get_deployment_handle(stage, app_name=app_name)
    request = ReadRequest(
        question="How long does the battery last?", documents=[ReadDocument(id="d", text=TEXT)]
    )
    stop = threading.Event()
    served = [0]

    def worker() -> None:
        while not stop.is_set():
            reader.read.remote(request).result()
            served[0] += 1

    samples: list[tuple[float, str, int]] = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    try:
        while (elapsed := time.monotonic() - t0) < load_s:
            samples.append((elapsed, "load", replica_count(stage, app_name)))
            printer(f"{elapsed:5.1f}s  load  {stage} replicas={samples[-1][2]}  served={served[0]}")
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    printer(f"load stopped after {served[0]} reads")
    t1 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < load_s + cool_s:
        samples.append((elapsed, "idle", replica_count(stage, app_name)))
        printer(f"{elapsed:5.1f}s  idle  {stage} replicas={samples[-1][2]}")
        if samples[-1][2] == 1 and time.monotonic() - t1 > 3 and max(s[2] for s in samples) > 1:
            break
        time.sleep(1)
    serve.delete(app_name)
    return samples


def register(sub: Any) -> None:
    p = sub.add_parser("autoscale-demo", help="load the Reader and watch it scale up, then down")
    p.add_argument("--config", default="local.yaml")
    p.add_argument("--load-s", type=float, default=40.0)
    p.add_argument("--cool-s", type=float, default=40.0)
    p.add_argument("--concurrency", type=int, default=6)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from qaserve.server import resolve_config

    cfg = GraphConfig.load(resolve_config(args.config))
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        samples = run_demo(
            cfg, load_s=args.load_s, cool_s=args.cool_s, concurrency=args.concurrency
        )
    finally:
        serve.shutdown()
        ray.shutdown()
    peak = max(s[2] for s in samples)
    final = samples[-1][2]
    print(f"peak replicas {peak}, after the load {final}")
    return 0 if peak > 1 and final < peak else 1
