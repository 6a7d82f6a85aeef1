"""The graph builder: one Ray Serve deployment per registered stage, wired by name into the
Ingress; `serve run qaserve.runtime.graph:app` and Serve config files enter here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from qaserve.runtime.graph_config import INGRESS, GraphConfig
from qaserve.stages import STAGES

if TYPE_CHECKING:
    from ray.serve import Deployment


def build_graph(cfg: GraphConfig) -> Any:
    """The bound application; `serve.run(build_graph(cfg))`."""
    from qaserve.runtime.ingress import Ingress

    engine = cfg.engine.model_dump(mode="json")
    logging: dict[str, Any] = {"logging_config": cfg.logging.model_dump()}
    bound: dict[str, Any] = {}
    for s in STAGES:  # the registry lists a stage after the stages it needs
        batch = cfg.batching[s.deployment].model_dump() if s.deployment in cfg.batching else {}
        replica = {
            "batch": batch,
            "threads": cfg.stages[s.deployment].threads,
            "sample_corpus": cfg.sample_corpus,  # the store owner seeds an empty store
        }
        needs = {name: bound[name] for name in s.needs}
        opts = cfg.stages[s.deployment].serve_options() | logging
        bound[s.name] = s.deployment_class().options(**opts).bind(engine, replica, needs)
    ingress = cast("Deployment", Ingress)  # @serve.deployment: mypy skips class decorators
    return ingress.options(**cfg.stages[INGRESS].serve_options(), **logging).bind(
        cfg.server.model_dump(mode="json"), engine, bound
    )


def app(args: dict[str, Any]) -> Any:
    """Application builder for Serve config files: `import_path: qaserve.runtime.graph:app`.

    `args.config` names a qaserve graph YAML (a path on the cluster, or one of the packaged
    configs); `args.graph` carries the graph inline instead (what `qaserve deploy` sends, so
    the file need not exist on the cluster); `args.data_dir` overrides the store folder.
    """
    from qaserve.runtime.server import resolve_config

    overrides = {}
    if args.get("data_dir"):
        overrides["data_dir"] = args["data_dir"]
    if args.get("graph") is not None:
        return build_graph(GraphConfig.from_data(args["graph"], **overrides))
    return build_graph(GraphConfig.load(resolve_config(args.get("config")), **overrides))
