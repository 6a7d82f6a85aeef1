"""What `qaserve serve` deploys: the engine, the HTTP layer and each deployment's Ray Serve
options, from a graph YAML. The deployments and their defaults come from the stage registry
(qaserve.stages); the YAML only overrides them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qaserve.config import EngineConfig, ServerConfig, apply_overrides
from qaserve.stages import DEPLOYMENTS, INGRESS, STAGES

APP_NAME = "qaserve"


class BatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1)


class StageOptions(BaseModel):
    """Ray Serve deployment options for one deployment (the names Serve's config file uses)."""

    model_config = ConfigDict(extra="forbid")
    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.25})
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)
    graceful_shutdown_timeout_s: float = 5.0
    health_check_period_s: float = 5.0
    # qaserve's, not Serve's: the torch / ONNX Runtime threads of each replica. Default: its
    # CPU grant rounded up. More than the grant trades throughput under load for latency
    # when the machine is idle (a 0.4-CPU reader with 2 threads answers alone at full speed).
    threads: int | None = Field(None, ge=1, le=256)

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> StageOptions:
        if self.autoscaling_config is not None and self.num_replicas not in (None, "auto"):
            self.num_replicas = None
        return self

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"threads"})


def default_stages() -> dict[str, StageOptions]:
    """The registry's defaults, sized for one 2-core machine: grants add up to at most 2 and
    each replica bounds its threads to its grant (rounded up to 1)."""
    opts = {INGRESS: StageOptions(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=64)}
    for s in STAGES:
        opts[s.deployment] = StageOptions(
            ray_actor_options={"num_cpus": s.num_cpus},
            max_ongoing_requests=s.max_ongoing_requests,
            max_queued_requests=s.max_queued_requests,
        )
    return opts


def default_batching() -> dict[str, BatchOptions]:
    return {
        s.deployment: BatchOptions(max_batch_size=s.batch[0], batch_wait_timeout_s=s.batch[1])
        for s in STAGES
        if s.batch is not None
    }


class LoggingOptions(BaseModel):
    """Ray Serve's logging for every deployment and, with `qaserve serve`, its proxy. On a
    small machine the per-request access log lines of the proxy and each replica cost CPU
    that the models need (serve/configs/local.yaml turns them off)."""

    model_config = ConfigDict(extra="forbid")
    enable_access_log: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"


class GraphConfig(BaseModel):
    """Everything `qaserve serve` deploys: the engine, the HTTP layer and each stage's options."""

    # The input holds the API keys: an error names the field, never echoes the value.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    stages: dict[str, StageOptions] = Field(default_factory=default_stages)
    batching: dict[str, BatchOptions] = Field(default_factory=default_batching)
    logging: LoggingOptions = Field(default_factory=LoggingOptions)
    # The Retriever ingests the shipped sample corpus at startup when its store is empty, and
    # is not ready (/readyz 503) until it has: however the graph is deployed, ready means the
    # documents are there. `qaserve serve` turns it on unless --no-sample.
    sample_corpus: bool = False

    @model_validator(mode="after")
    def _check(self) -> GraphConfig:
        unknown = set(self.stages) - set(DEPLOYMENTS)
        if unknown:
            hint = (
                " (the ensemble runs inside the pipeline now: drop its entry)"
                if "Ensemble" in unknown
                else ""
            )
            raise ValueError(
                f"unknown stages {sorted(unknown)}; the deployments are {list(DEPLOYMENTS)}{hint}"
            )
        batching = [s.deployment for s in STAGES if s.batch is not None]
        wrong = set(self.batching) - set(batching)
        if wrong:
            raise ValueError(f"batching {sorted(wrong)}: only {batching} batch")
        for name, default in default_stages().items():
            self.stages.setdefault(name, default)
        for name, batch in default_batching().items():
            self.batching.setdefault(name, batch)
        retr = self.stages["Retriever"]
        if self.engine.store.url is None and (
            retr.autoscaling_config is not None or retr.num_replicas not in (1, None)
        ):
            raise ValueError(
                "the embedded Qdrant Edge store has one owner: run the Retriever as one replica "
                "(scale the Embedder instead) or set engine.store.url to a Qdrant server"
            )
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, **engine_overrides: Any) -> GraphConfig:
        """A YAML with `engine:`, `server:`, `stages:`, `batching:` keys (all optional);
        keyword overrides (dotted keys) apply to the engine section."""
        data: dict[str, Any] = {}
        if path:
            data = read_graph_yaml(path)
        return cls.from_data(data, **engine_overrides)

    @classmethod
    def from_data(cls, data: dict[str, Any], **engine_overrides: Any) -> GraphConfig:
        """From the parsed YAML, `${VAR}` / `${VAR:-default}` expanded from this process's
        environment (so a cluster's Qdrant URL can come from the nodes, not the file)."""
        data = expand_env(dict(data))
        data["engine"] = apply_overrides(dict(data.get("engine") or {}), engine_overrides)
        return cls.model_validate(data)


def read_graph_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any) -> Any:
    """`${VAR}` and `${VAR:-default}` in every string of a parsed YAML; an unset variable
    without a default is an error rather than an empty string."""
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name) or default
        if found is None:
            raise ValueError(f"${{{name}}} is not set and has no default (${{{name}:-...}})")
        return found

    return _ENV_REF.sub(sub, value)
