"""The stage registry: the one place that says what the model stages are.

Config defaults (`stages:` of a graph YAML), the Ray deployments and their default options,
GPU placement, model resolution, readiness (`/readyz` keys), `/v1/models` and the graph
builder all read `STAGES`. Adding a stage is an entry here, its plain class and thin Ray
wrapper in `deployments/`, and a line of `qaserve.pipeline`.

The ensemble policy is not a stage: it takes microseconds and runs inside the pipeline.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qaserve.config import EngineConfig
    from qaserve_client.schema import ModelInfo

# fn(engine config, threads, the stages it needs, built) -> the plain stage object
Factory = Callable[["EngineConfig", int | None, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Stage:
    name: str  # readiness key, ModelInfo.stage
    deployment: str  # Ray Serve deployment name; its key under `stages:` in a graph YAML
    config: str  # the EngineConfig section with its settings (`model`, `device`, ...)
    factory: str  # "module:function" building the plain stage object (a Factory)
    wrapper: str  # "module:Class": the thin Ray Serve deployment around it
    num_cpus: float  # default CPU grant per replica (a 2-core machine: grants sum to <= 2)
    max_ongoing_requests: int
    max_queued_requests: int
    gpu: bool = False  # a replica granted a GPU runs this stage's model on CUDA
    needs: tuple[str, ...] = ()  # stages its factory receives, built first
    batch: tuple[int, float] | None = None  # default dynamic batching (size, wait seconds)

    def build(self, cfg: EngineConfig, threads: int | None, built: Mapping[str, Any]) -> Any:
        return _load(self.factory)(cfg, threads, built)

    def deployment_class(self) -> Any:
        return _load(self.wrapper)


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


STAGES: tuple[Stage, ...] = (
    Stage(
        "embedder",
        "Embedder",
        "embedder",
        "qaserve.deployments.retriever:build_embedder",
        "qaserve.deployments.retriever_deployment:EmbedderDeployment",
        num_cpus=0.15,
        max_ongoing_requests=64,
        max_queued_requests=64,
        gpu=True,
        batch=(16, 0.005),
    ),
    Stage(
        "retriever",
        "Retriever",
        "store",
        "qaserve.deployments.retriever:build_retriever",
        "qaserve.deployments.retriever_deployment:RetrieverDeployment",
        num_cpus=0.15,
        max_ongoing_requests=64,
        max_queued_requests=64,
        gpu=True,  # it embeds queries itself: no hop on the query path
        needs=("embedder",),
        batch=(16, 0.005),
    ),
    Stage(
        "reader",
        "Reader",
        "reader",
        "qaserve.deployments.reader:build_reader",
        "qaserve.deployments.reader_deployment:ReaderDeployment",
        num_cpus=0.4,
        max_ongoing_requests=64,
        max_queued_requests=64,
        gpu=True,
        batch=(1, 0.0),
    ),
    Stage(
        "generator",
        "Generator",
        "generator",
        "qaserve.deployments.generator:build_generator",
        "qaserve.deployments.generator_deployment:GeneratorDeployment",
        num_cpus=0.7,
        max_ongoing_requests=2,
        max_queued_requests=16,
        gpu=True,
    ),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
INGRESS = "Ingress"
# Every deployment of the graph, in the order a Serve config lists them.
DEPLOYMENTS: tuple[str, ...] = (INGRESS, *(s.deployment for s in STAGES))


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; the stages are {sorted(BY_NAME)}") from None


def with_needs(names: Iterator[str] | tuple[str, ...] | list[str]) -> list[Stage]:
    """The named stages and what they need, dependencies first."""
    order: list[Stage] = []

    def visit(name: str) -> None:
        s = stage(name)
        for dep in s.needs:
            visit(dep)
        if s not in order:
            order.append(s)

    for name in names:
        visit(name)
    return order


def build_stages(
    cfg: EngineConfig,
    names: tuple[str, ...] | list[str],
    threads: int | None,
    built: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Plain stage objects for `names` (and their needs), as one process holds them; the
    stages already in `built` are kept, the others added to it."""
    built = {} if built is None else built
    for s in with_needs(names):
        if s.name not in built:
            built[s.name] = s.build(cfg, threads, built)
    return built


def model_infos(info: Any) -> list[ModelInfo]:
    """A stage's `info()` (one ModelInfo or several) as a list."""
    return list(info) if isinstance(info, list | tuple) else [info]
