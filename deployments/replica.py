"""What every stage's Ray replica does the same way: its engine config (models fetched from
the model store, CUDA when granted a GPU), its thread budget, its stage objects, batch metrics."""

from __future__ import annotations

import math
from typing import Any

from qaserve.config import EngineConfig
from qaserve.stages import build_stages, stage, with_needs
from qaserve.threads import bound_threads


def replica_threads(requested: int | None = None) -> int:
    """Threads for this replica: as configured (`threads:`), else its CPU grant rounded up."""
    import ray

    if requested:
        return bound_threads(requested)
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:
        cpus = 1.0
    return bound_threads(max(1, math.ceil(cpus - 1e-6)))


def replica_config(engine: dict[str, Any], name: str) -> EngineConfig:
    """The engine config for this replica of stage `name`: a replica granted a GPU
    (`num_gpus` in its ray_actor_options) runs the models of its stage (and of the stages
    that stage needs) on CUDA. Models named in the model store are fetched first."""
    import ray

    cfg = EngineConfig.model_validate(engine).resolve_models()
    try:
        gpus = ray.get_gpu_ids()
    except Exception:
        gpus = []
    if gpus:
        for s in with_needs([name]):
            section = getattr(cfg, s.config)
            if s.gpu and getattr(section, "device", None) == "cpu":
                section.device = "cuda"
    return cfg


def build_replica_stage(engine: dict[str, Any], name: str, replica: dict[str, Any]) -> Any:
    """This replica's stage object (and, inside it, what it needs); `replica` is what the
    builder passes every wrapper: {"batch": its batching options, "threads": n or None}."""
    stage(name)
    cfg = replica_config(engine, name)
    return build_stages(cfg, [name], replica_threads(replica.get("threads")))[name]


def batch_histogram(name: str) -> Any:
    """Batch sizes per stage, exported with Ray's metrics (Prometheus) beside Serve's own
    per-deployment request counts, error counts, latency histograms and queue lengths."""
    from ray.serve.metrics import Histogram

    hist = Histogram(
        "qaserve_batch_size",
        description="Requests per dynamic batch.",
        boundaries=[1, 2, 4, 8, 16, 32, 64],
        tag_keys=("stage",),
    )
    hist.set_default_tags({"stage": name})
    return hist


def configure_batch(method: Any, replica: dict[str, Any]) -> bool:
    """Apply the `batching:` entry to a `@serve.batch` method; False when it batches nothing
    (max_batch_size 1), so the caller can skip the batch queue altogether."""
    batch = replica.get("batch") or {}
    size = int(batch.get("max_batch_size", 1))
    method.set_max_batch_size(size)
    method.set_batch_wait_timeout_s(float(batch.get("batch_wait_timeout_s", 0.0)))
    return size > 1
