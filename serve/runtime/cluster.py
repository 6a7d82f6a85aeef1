"""Running on a Ray cluster: `qaserve deploy`, `qaserve status`, `qaserve publish-model`.

`deploy` sends the same declarative config `serve deploy` sends (the Serve config generated
from a GraphConfig) with the graph carried inline in the application's args, so the YAML
need not exist on the cluster, and the qaserve packages uploaded as the application's
runtime_env working_dir (or a wheel URL the nodes can reach, installed with `pip`):

- `http://head:8265`: through the dashboard's Serve REST API (what `serve deploy` uses);
- `ray://head:10001`: through Ray Client and `serve.run`.

`status` shows each stage's replicas, the node each runs on (with the node's qaserve
resources and labels, i.e. its kind) and their health.
The node-loss drill harness (a local multi-node cluster, a steady trickle of queries) is
test code: tests/cluster_harness.py.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from qaserve.runtime.graph_config import APP_NAME, GraphConfig, read_graph_yaml
from qaserve.runtime.server import add_allow_public, check_exposure, resolve_config, serve_config
from qaserve.stages import DEPLOYMENTS

NODE_KIND_PREFIXES = ("qaserve_", "qaserve.io/")


# --- what gets deployed ----------------------------------------------------------------------


def stage_packages(dest: Path) -> Path:
    """A folder holding the importable qaserve packages (qaserve, qaserve.deployments,
    qaserve_client), copied from wherever this process imports them; it becomes the
    replicas' working_dir, which Ray puts on their sys.path."""
    import qaserve
    import qaserve.deployments
    import qaserve_client

    # weights/: the shipped reader's fp16 source weights: `bench reader` reads them, replicas never.
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "weights")
    root = dest / "qaserve-app"
    shutil.copytree(Path(qaserve.__file__).parent, root / "qaserve", ignore=skip)
    deployments = root / "qaserve" / "deployments"
    if not (deployments / "__init__.py").exists():  # an editable install maps it elsewhere
        shutil.rmtree(deployments, ignore_errors=True)
        shutil.copytree(Path(qaserve.deployments.__file__).parent, deployments, ignore=skip)
    shutil.copytree(Path(qaserve_client.__file__).parent, root / "qaserve_client", ignore=skip)
    return root


def deploy_config(
    graph_config: str | Path,
    runtime_env: dict[str, Any],
    host: str = "0.0.0.0",
    port: int = 8000,
    proxy_location: str = "EveryNode",
) -> dict[str, Any]:
    """The ServeDeploySchema dict for a graph YAML, the graph inline in the app's args
    (its `${VAR}` references unexpanded: the cluster expands them from its nodes' env)."""
    path = resolve_config(graph_config)
    assert path is not None
    raw = read_graph_yaml(path)
    cfg = GraphConfig.from_data(raw)  # fail here, not on the cluster, on a bad config
    if cfg.server.api_keys:
        # The keys (from the YAML or this machine's QASERVE_API_KEYS) travel as digests only:
        # the app's args are what `serve config` and the dashboard show.
        keys = cfg.server.model_dump(mode="json")["api_keys"]
        raw = {**raw, "server": {**(raw.get("server") or {}), "api_keys": keys}}
    config = serve_config(cfg, str(graph_config), host, port, proxy_location)
    app = config["applications"][0]
    app["args"] = {"graph": raw}
    app["runtime_env"] = runtime_env
    return config


def runtime_env_for(workdir: Path | None, wheel: str | None, env: dict[str, str]) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {}
    if wheel:
        runtime_env["pip"] = {"packages": [wheel], "pip_check": False}
    elif workdir is not None:
        runtime_env["working_dir"] = str(workdir)
    if env:
        runtime_env["env_vars"] = dict(env)
    return runtime_env


def deploy(
    address: str,
    graph_config: str | Path = "cluster.yaml",
    wheel: str | None = None,
    env: dict[str, str] | None = None,
    host: str = "0.0.0.0",
    port: int = 8000,
    proxy_location: str = "EveryNode",
) -> dict[str, Any]:
    """Deploy the graph onto the cluster at `address`; returns the config that was sent."""
    with tempfile.TemporaryDirectory(prefix="qaserve-deploy-") as tmp:
        workdir = None if wheel else stage_packages(Path(tmp))
        runtime_env = runtime_env_for(workdir, wheel, env or {})
        config = deploy_config(graph_config, runtime_env, host, port, proxy_location)
        if address.startswith(("http://", "https://")):
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            client = ServeSubmissionClient(address)
            # Zips the local working_dir into the cluster's GCS, as `serve deploy` would need
            # a remote URI for; the config then names the uploaded package.
            client._upload_working_dir_if_needed(config["applications"][0]["runtime_env"])
            client.deploy_applications(config)
        elif address.startswith("ray://"):
            _deploy_ray_client(address, config)
        else:
            raise ValueError(
                f"--address {address!r}: expected http(s)://head:8265 or ray://head:10001"
            )
    return config


def _deploy_ray_client(address: str, config: dict[str, Any]) -> None:
    """Ray Client: the job's runtime_env (uploaded on connect) is what Serve gives replicas."""
    import ray
    from ray import serve

    from qaserve.runtime.graph import build_graph

    app = config["applications"][0]
    ray.init(address=address, runtime_env=app["runtime_env"], log_to_driver=False)
    try:
        serve.start(
            http_options=config["http_options"],
            proxy_location=config["proxy_location"],
            logging_config=config.get("logging_config"),
        )
        graph = build_graph(GraphConfig.from_data(app["args"]["graph"]))
        serve.run(graph, name=app["name"], route_prefix=app["route_prefix"], blocking=False)
    finally:
        ray.shutdown()


# --- status ------------------------------------------------------------------------------------


@dataclass
class ReplicaRow:
    stage: str
    stage_status: str
    replica: str
    state: str
    node_id: str
    node_kind: str


def node_kind(resources: dict[str, Any], labels: dict[str, Any]) -> str:
    """What a node is for, by the qaserve resources and labels it advertises (and its GPUs)."""
    kinds = [k for k in resources if k.startswith(NODE_KIND_PREFIXES)]
    kinds += [f"{k}={v}" for k, v in labels.items() if k.startswith(NODE_KIND_PREFIXES)]
    if resources.get("GPU"):
        kinds.append(f"GPU:{resources['GPU']:g}")
    return ",".join(sorted(kinds)) or "-"


def serve_details(address: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Serve's instance details (the dashboard's schema) and each alive node's kind, from the
    dashboard (http) or from a driver connected to the cluster (ray:// or a GCS address)."""
    if address and address.startswith(("http://", "https://")):
        import httpx
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        details = ServeSubmissionClient(address).get_serve_details()
        r = httpx.get(f"{address.rstrip('/')}/api/v0/nodes", params={"detail": 1}, timeout=30)
        r.raise_for_status()
        nodes = r.json()["data"]["result"]["result"]
        kinds = {
            n["node_id"]: node_kind(n.get("resources_total") or {}, n.get("labels") or {})
            for n in nodes
            if n.get("state") == "ALIVE"
        }
        return details, kinds
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    connected = ray.is_initialized()
    if not connected:
        ray.init(address=address or "auto", log_to_driver=False)
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        # An actor method call: ray.get's overloads cannot tell its result from a list's.
        details = cast("dict[str, Any]", ray.get(controller.get_serve_instance_details.remote()))
        kinds = {
            n["NodeID"]: node_kind(n.get("Resources") or {}, n.get("Labels") or {})
            for n in ray.nodes()
            if n.get("Alive")
        }
        return details, kinds
    finally:
        if not connected:
            ray.shutdown()


def _name(value: Any) -> str:
    """An enum from the controller (a driver's view) or its string value (the dashboard's)."""
    return str(getattr(value, "value", value))


def replica_rows(details: dict[str, Any], kinds: dict[str, str]) -> list[ReplicaRow]:
    app = (details.get("applications") or {}).get(APP_NAME) or {}
    deployments = app.get("deployments") or {}
    rows = []
    for stage in DEPLOYMENTS:
        dep = deployments.get(stage) or {}
        status = _name(dep.get("status", "MISSING"))
        replicas = dep.get("replicas") or []
        if not replicas:
            rows.append(ReplicaRow(stage, status, "-", "-", "-", "-"))
        for rep in replicas:
            node = rep.get("node_id") or "-"
            rows.append(
                ReplicaRow(
                    stage,
                    status,
                    str(rep.get("replica_id", "-")),
                    _name(rep.get("state", "-")),
                    node,
                    kinds.get(node, "lost" if node != "-" else "-"),
                )
            )
    return rows


def format_status(details: dict[str, Any], rows: list[ReplicaRow]) -> str:
    app = (details.get("applications") or {}).get(APP_NAME) or {}
    lines = [f"application {APP_NAME}: {_name(app.get('status', 'NOT DEPLOYED'))}"]
    header = ("stage", "status", "replica", "state", "node", "node kind")
    table = [header] + [
        (r.stage, r.stage_status, r.replica[:12], r.state, r.node_id[:12], r.node_kind)
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def wait_running(address: str | None, timeout_s: float = 300) -> list[ReplicaRow]:
    """Until every stage of the app is HEALTHY with its replicas RUNNING; the rows then."""
    deadline = time.monotonic() + timeout_s
    rows: list[ReplicaRow] = []
    while time.monotonic() < deadline:
        try:
            details, kinds = serve_details(address)
            rows = replica_rows(details, kinds)
            app = (details.get("applications") or {}).get(APP_NAME) or {}
            if _name(app.get("status")) == "DEPLOY_FAILED":
                raise RuntimeError(f"deploy failed: {app.get('message', '')[-3000:]}")
            if rows and all(r.stage_status == "HEALTHY" and r.state == "RUNNING" for r in rows):
                return rows
        except (ConnectionError, OSError):
            pass
        time.sleep(2)
    raise TimeoutError("the application did not become healthy:\n" + format_status({}, rows))


def register(sub: Any) -> None:
    p = sub.add_parser("deploy", help="deploy the graph onto a Ray cluster (serve deploy)")
    p.add_argument(
        "--address",
        required=True,
        help="http://head:8265 (dashboard, as serve deploy) or ray://head:10001 (Ray Client)",
    )
    p.add_argument("--config", default="cluster.yaml", help="graph YAML (default: cluster.yaml)")
    p.add_argument(
        "--wheel",
        default=None,
        help="a qaserve wheel URL the nodes can reach, pip-installed "
        "per application (default: upload the local packages as the working_dir)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for every replica (not for secrets)",
    )
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--proxy-location", default="EveryNode", choices=["HeadOnly", "EveryNode", "Disabled"]
    )
    add_allow_public(p)
    p.set_defaults(func=_cmd_deploy)

    p = sub.add_parser("status", help="each stage's replicas, their nodes and health")
    p.add_argument(
        "--address",
        default=None,
        help="http://head:8265, ray://head:10001 or a GCS address (default: auto)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("publish-model", help="copy a model into the model store by content hash")
    p.add_argument("model", type=Path, help="a model folder (or a single file such as a GGUF)")
    p.add_argument("--store", required=True, help="store root: path, file://, s3://, gs://, ...")
    p.add_argument(
        "--reader-int8",
        action="store_true",
        help="export this QA checkpoint to int8 ONNX first, so nodes never export",
    )
    p.set_defaults(func=_cmd_publish)


def _cmd_deploy(args: Any) -> int:
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--env {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        env[key] = value
    graph = GraphConfig.load(resolve_config(args.config))
    if not check_exposure(args.host, graph.server, args.allow_public):
        return 2
    deploy(args.address, args.config, args.wheel, env, args.host, args.port, args.proxy_location)
    print(
        f"qaserve: deployed {args.config} to {args.address}; `qaserve status --address "
        f"{args.address}` shows where each stage runs",
        flush=True,
    )
    return 0


def _cmd_status(args: Any) -> int:
    import json

    details, kinds = serve_details(args.address)
    rows = replica_rows(details, kinds)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    else:
        print(format_status(details, rows))
    healthy = all(r.stage_status == "HEALTHY" and r.state == "RUNNING" for r in rows)
    return 0 if healthy else 1


def _cmd_publish(args: Any) -> int:
    from qaserve.modelstore import publish

    src = args.model
    with tempfile.TemporaryDirectory(prefix="qaserve-publish-") as tmp:
        if args.reader_int8:
            from qaserve.deployments.onnx_export import export_reader

            src = export_reader(src, Path(tmp), "int8")
        ref = publish(src, args.store)
    print(ref)
    return 0
