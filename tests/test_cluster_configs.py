"""The cluster artifacts cannot drift from the code: the graph config loads into GraphConfig, the
Serve config is generated from it and passes Ray's schema, the `ray up` file passes the
autoscaler's JSON schema, and the KubeRay manifest carries the same Serve config, worker
groups that provide every resource and label the stages ask for, and the Qdrant it names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from qaserve.runtime.graph_config import GraphConfig, expand_env
from qaserve.runtime.server import CONFIG_DIR, render_serve_config
from qaserve.stages import DEPLOYMENTS as STAGES

SERVE_CLUSTER_ARGS = ("cluster.yaml", "0.0.0.0", 8000, "EveryNode")


def _stage_needs(graph: GraphConfig) -> dict[str, dict[str, Any]]:
    """Per stage: the custom resources, labels and GPUs its replicas ask for."""
    needs = {}
    for name in STAGES:
        opts = graph.stages[name].ray_actor_options
        needs[name] = {
            "resources": set(opts.get("resources", {})),
            "labels": dict(opts.get("label_selector", {})),
            "gpus": opts.get("num_gpus", 0),
            "cpus": opts.get("num_cpus", 1),
        }
    return needs


def _fits(need: dict[str, Any], node: dict[str, Any]) -> bool:
    return (
        need["resources"] <= set(node["resources"])
        and all(node["labels"].get(k) == v for k, v in need["labels"].items())
        and (need["gpus"] == 0 or node["gpus"] >= need["gpus"])
        and node["cpus"] >= need["cpus"]
    )


def _graph() -> GraphConfig:
    return GraphConfig.load(CONFIG_DIR / "cluster.yaml")


def test_cluster_graph_config_loads_and_places_every_stage() -> None:
    graph = _graph()
    assert graph.engine.store.url == "http://qdrant:6333"
    assert graph.engine.store.api_key is None or "api_key" not in graph.engine.model_dump()
    assert graph.engine.store.shard_number and graph.engine.store.replication_factor
    needs = _stage_needs(graph)
    assert needs["Generator"]["gpus"] >= 1 and needs["Reader"]["gpus"] > 0
    assert all(n["resources"] or n["labels"] for n in needs.values()), needs
    # The Retriever scales out: it needs a server URL (the Edge shard has one owner).
    retr = graph.stages["Retriever"]
    assert retr.autoscaling_config and retr.autoscaling_config["max_replicas"] > 1


def test_store_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QASERVE_STORE_URL", "https://qdrant.example:6333")
    monkeypatch.setenv("QDRANT_API_KEY", "secret-key-123")
    graph = _graph()
    assert graph.engine.store.url == "https://qdrant.example:6333"
    assert graph.engine.store.api_key == "secret-key-123"
    # The key is never serialised into what Serve stores (deployment args, configs).
    dumped = json.dumps(graph.engine.model_dump(mode="json"))
    assert "secret-key-123" not in dumped
    with pytest.raises(ValueError, match="NOPE_UNSET"):
        expand_env({"x": "${NOPE_UNSET}"})
    assert expand_env(["${NOPE_UNSET:-d}", 3]) == ["d", 3]


def test_serve_cluster_yaml_is_generated_and_passes_rays_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    committed = (CONFIG_DIR / "serve-cluster.yaml").read_text()
    assert committed == render_serve_config(*SERVE_CLUSTER_ARGS), (
        "serve/configs/serve-cluster.yaml drifted: regenerate it with the command in its header"
    )
    schema = ServeDeploySchema.model_validate(yaml.safe_load(committed))
    assert schema.proxy_location == "EveryNode"
    app = schema.applications[0]
    assert [d.name for d in app.deployments] == list(STAGES)
    by_name = {d.name: d for d in app.deployments}
    assert (by_name["Generator"].ray_actor_options.num_gpus or 0) >= 1


def _ray_up() -> dict[str, Any]:
    return yaml.safe_load((CONFIG_DIR / "ray-cluster.yaml").read_text())


def test_ray_up_config_passes_the_autoscaler_schema_and_hosts_every_stage() -> None:
    import jsonschema
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    data = _ray_up()
    jsonschema.validate(data, json.loads(schema_path.read_text()))
    nodes = {
        name: {
            "resources": t.get("resources", {}),
            "labels": t.get("labels", {}),
            "gpus": t.get("resources", {}).get("GPU", 0),
            "cpus": t.get("resources", {}).get("CPU", 0),
        }
        for name, t in data["available_node_types"].items()
    }
    assert data["head_node_type"] in nodes
    for stage, need in _stage_needs(_graph()).items():
        assert any(_fits(need, n) for n in nodes.values()), (stage, need)
    assert ray.__version__ in data["docker"]["image"]


def _kuberay() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((CONFIG_DIR / "kuberay-rayservice.yaml").read_text()))


def _group_node(group: dict[str, Any]) -> dict[str, Any]:
    params = group["rayStartParams"]
    resources = json.loads(json.loads(params["resources"])) if "resources" in params else {}
    labels = dict(kv.split("=", 1) for kv in params.get("labels", "").split(",") if kv)
    container = group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    assert gpus == float(limits.get("nvidia.com/gpu", 0)), "num-gpus must match the pod's GPUs"
    return {"resources": resources, "labels": labels, "gpus": gpus, "cpus": float(limits["cpu"])}


def test_kuberay_rayservice_matches_the_serve_config_and_hosts_every_stage() -> None:
    from ray.serve.schema import ServeDeploySchema

    docs = _kuberay()
    service = next(d for d in docs if d["kind"] == "RayService")
    serve_v2 = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_v2)
    assert serve_v2 == yaml.safe_load((CONFIG_DIR / "serve-cluster.yaml").read_text()), (
        "serveConfigV2 differs from serve-cluster.yaml: paste the regenerated file into it"
    )
    cluster = service["spec"]["rayClusterConfig"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    groups = {g["groupName"]: _group_node(g) for g in cluster["workerGroupSpecs"]}
    for stage, need in _stage_needs(_graph()).items():
        assert any(_fits(need, n) for n in groups.values()), (stage, need, groups)


def test_kuberay_qdrant_is_what_the_nodes_point_at() -> None:
    docs = _kuberay()
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    sts = by_kind_name[("StatefulSet", "qdrant")]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"] == pod_labels
    assert ("Service", sts["spec"]["serviceName"]) in by_kind_name  # the peers' headless one
    assert sts["spec"]["replicas"] >= _graph().engine.store.replication_factor
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QDRANT__CLUSTER__ENABLED"]["value"] == "true"
    service = next(d for d in docs if d["kind"] == "RayService")
    spec = service["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    secret = env["QDRANT__SERVICE__API_KEY"]["valueFrom"]["secretKeyRef"]
    for group in pods:
        container = group["template"]["spec"]["containers"][0]
        penv = {e["name"]: e for e in container["env"]}
        url = penv["QASERVE_STORE_URL"]["value"]
        host, port = url.removeprefix("http://").split(":")
        svc = by_kind_name[("Service", host)]
        assert svc["spec"]["selector"] == pod_labels
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
        # Ray pods read the same secret Qdrant is started with.
        assert penv["QDRANT_API_KEY"]["valueFrom"]["secretKeyRef"] == secret


def test_qdrant_cluster_settings_reach_create_collection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qdrant-client's local mode accepts the sharding arguments and ignores them (one
    process has no shards); on_disk it keeps. Record what create_collection was given."""
    from qdrant_client import QdrantClient

    from qaserve.config import StoreConfig
    from qaserve.deployments.store import DENSE, QdrantClientStore

    seen: dict[str, Any] = {}
    real = QdrantClient.create_collection

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(QdrantClient, "create_collection", spy)
    cfg = StoreConfig(
        url=f"path:{tmp_path / 'q'}",
        shard_number=3,
        replication_factor=2,
        write_consistency_factor=2,
        on_disk=True,
    )
    assert cfg.url is not None
    store = QdrantClientStore(cfg.url, "docs", 4, cfg)
    try:
        store._create()
        assert {k: seen[k] for k in ("shard_number", "replication_factor")} == {
            "shard_number": 3,
            "replication_factor": 2,
        }
        assert seen["write_consistency_factor"] == 2
        info = store._client.get_collection("docs")
        assert info.config.params.vectors[DENSE].on_disk is True
    finally:
        store.close()
    defaults = StoreConfig(url=":memory:")
    plain = QdrantClientStore(":memory:", "docs", 4, defaults)
    assert plain.cluster_settings() == {}
    plain.close()


def test_env_reference_in_a_packaged_config_has_a_default() -> None:
    """Every ${VAR} in the cluster graph has a default, so it loads in CI and on a laptop."""
    text = (CONFIG_DIR / "cluster.yaml").read_text()
    saved = {
        k: os.environ.pop(k)
        for k in ("QASERVE_STORE_URL", "QASERVE_MODEL_STORE")
        if k in os.environ
    }
    try:
        GraphConfig.model_validate(expand_env(yaml.safe_load(text)))
    finally:
        os.environ.update(saved)
