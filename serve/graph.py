"""The Ray Serve graph: thin deployments around the stage classes, wired by DeploymentHandles.

    Ingress (FastAPI) -> Retriever (store owner) -> Embedder (scales out, batched)
                      -> Reader (batched windows) | Generator (tokens)  -> Ensemble

Resources, replicas, autoscaling and queue limits come from `GraphConfig.stages` (and from a
Serve config file generated from it), never from the code. The embedded Qdrant Edge shard
can be open in one process only, so with it the Retriever runs as a single replica while
the Embedder scales; with a Qdrant URL the Retriever scales too.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from qaserve.config import EngineConfig, ServerConfig, apply_overrides
from qaserve.engine import as_read_documents, query_response
from qaserve.errors import BadRequest, Overloaded, QAServeError, StageTimeout
from qaserve.threads import bound_threads
from qaserve_client.schema import (
    DocumentOut,
    FinalAnswer,
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    IngestRequest,
    IngestResponse,
    ModelInfo,
    ModelsResponse,
    QueryRequest,
    QueryResponse,
    ReadDocument,
    ReadRequest,
    ReadResponse,
    RetrievedDocument,
    RetrieveRequest,
    RetrieveResponse,
)

T = TypeVar("T")
APP_NAME = "qaserve"
STAGES = ("Ingress", "Retriever", "Embedder", "Reader", "Generator", "Ensemble")


# --- configuration ---------------------------------------------------------------------------


class BatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1)


class StageOptions(BaseModel):
    """Ray Serve deployment options for one stage (the names Serve's config file uses)."""

    model_config = ConfigDict(extra="forbid")
    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.25})
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)
    graceful_shutdown_timeout_s: float = 5.0
    health_check_period_s: float = 5.0

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> StageOptions:
        if self.autoscaling_config is not None and self.num_replicas not in (None, "auto"):
            self.num_replicas = None
        return self

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _default_stages() -> dict[str, StageOptions]:
    # Sized for one 2-core machine: the CPU grants add up to 2 and each replica bounds its
    # threads to its grant (rounded up to 1), so replicas do not fight over the cores.
    cpu = {
        "Ingress": 0.1,
        "Retriever": 0.2,
        "Embedder": 0.3,
        "Reader": 0.6,
        "Generator": 0.7,
        "Ensemble": 0.1,
    }
    ongoing = {
        "Ingress": 64,
        "Retriever": 16,
        "Embedder": 16,
        "Reader": 16,
        "Generator": 2,
        "Ensemble": 32,
    }
    queued = {
        "Ingress": -1,
        "Retriever": 64,
        "Embedder": 64,
        "Reader": 64,
        "Generator": 16,
        "Ensemble": 64,
    }
    return {
        name: StageOptions(
            ray_actor_options={"num_cpus": cpu[name]},
            max_ongoing_requests=ongoing[name],
            max_queued_requests=queued[name],
        )
        for name in STAGES
    }


class GraphConfig(BaseModel):
    """Everything `qaserve serve` deploys: the engine, the HTTP layer and each stage's options."""

    model_config = ConfigDict(extra="forbid")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    stages: dict[str, StageOptions] = Field(default_factory=_default_stages)
    batching: dict[str, BatchOptions] = Field(
        default_factory=lambda: {
            "Embedder": BatchOptions(max_batch_size=16, batch_wait_timeout_s=0.005),
            "Reader": BatchOptions(max_batch_size=8, batch_wait_timeout_s=0.005),
        }
    )

    @model_validator(mode="after")
    def _check(self) -> GraphConfig:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; the stages are {STAGES}")
        for name, default in _default_stages().items():
            self.stages.setdefault(name, default)
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


def replica_threads() -> int:
    """Threads for this replica: its CPU grant rounded up to a whole core."""
    import math

    import ray

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:
        cpus = 1.0
    return bound_threads(max(1, math.ceil(cpus - 1e-6)))


# --- the deployments (thin: the stage classes do the work) -----------------------------------


def _engine_cfg(cfg: dict[str, Any]) -> EngineConfig:
    """The engine config for this replica: a replica granted a GPU (`num_gpus` in its
    ray_actor_options) runs its model on CUDA (ONNX Runtime's CUDA provider for the reader).
    Models named in the model store are fetched into this node's cache first."""
    import ray

    engine = EngineConfig.model_validate(cfg).resolve_models()
    try:
        gpus = ray.get_gpu_ids()
    except Exception:
        gpus = []
    if gpus:
        for stage in (engine.embedder, engine.reader, engine.generator):
            if stage.device == "cpu":
                stage.device = "cuda"
    return engine


def _batch_histogram(stage: str) -> Any:
    """Batch sizes per stage, exported with Ray's metrics (Prometheus) beside Serve's own
    per-deployment request counts, error counts, latency histograms and queue lengths."""
    from ray.serve.metrics import Histogram

    hist = Histogram(
        "qaserve_batch_size",
        description="Requests per dynamic batch.",
        boundaries=[1, 2, 4, 8, 16, 32, 64],
        tag_keys=("stage",),
    )
    hist.set_default_tags({"stage": stage})
    return hist


@serve.deployment(name="Embedder")
class EmbedderDeployment:
    def __init__(self, engine: dict[str, Any], batch: dict[str, Any]) -> None:
        from qaserve.deployments.retriever import Embedder

        cfg = _engine_cfg(engine)
        self.embedder = Embedder(cfg.embedder, threads=replica_threads())
        opts = BatchOptions.model_validate(batch)
        self.batch_sizes = _batch_histogram("embedder")
        self.embed_one.set_max_batch_size(opts.max_batch_size)
        self.embed_one.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed_one(self, texts: list[str]) -> list[Any]:
        """Queries from concurrent requests embedded as one batch."""
        self.batch_sizes.observe(len(texts))
        vectors = await asyncio.to_thread(self.embedder.embed, texts)
        return list(vectors)

    async def embed_many(self, texts: list[str]) -> Any:
        return await asyncio.to_thread(self.embedder.embed, texts)

    def describe(self) -> dict[str, Any]:
        e = self.embedder
        return {"dim": e.dim, "max_tokens": e.max_tokens, "info": e.info()}

    def ready(self) -> bool:
        return True


class _TokenizerOnly:
    """What the store owner needs of the encoder to split passages: its tokenizer and sizes."""

    def __init__(self, model: str, dim: int, max_tokens: int, info: ModelInfo) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.dim, self.max_tokens, self._info = dim, max_tokens, info

    def embed(self, texts: list[str]) -> Any:
        raise RuntimeError("the Retriever embeds through the Embedder deployment")

    def info(self) -> ModelInfo:
        return self._info


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    async def __init__(self, engine: dict[str, Any], embedder: DeploymentHandle) -> None:
        from qaserve.deployments.retriever import Retriever

        replica_threads()
        cfg = _engine_cfg(engine)
        self.embedder = embedder
        d = await embedder.describe.remote()
        tok = _TokenizerOnly(cfg.embedder.model, d["dim"], d["max_tokens"], d["info"])
        self.retriever = Retriever(cfg, embedder=tok)  # type: ignore[arg-type]
        self._write = asyncio.Lock()

    async def retrieve(self, request: RetrieveRequest) -> list[RetrievedDocument]:
        vector = None
        if request.retrieval != "sparse":
            vector = await self.embedder.embed_one.remote(request.query)
        return await asyncio.to_thread(
            self.retriever.retrieve,
            request.query,
            request.top_k,
            request.filters,
            request.collection,
            request.retrieval,
            vector,
        )

    async def ingest(self, request: IngestRequest) -> IngestResponse:
        docs, texts = self.retriever.prepare(request.documents)
        vectors = await self.embedder.embed_many.remote(texts)
        async with self._write:  # one writer at a time: replace-by-id must not interleave
            return await asyncio.to_thread(self.retriever.write, docs, vectors, request.collection)

    async def get(self, doc_id: str, collection: str | None) -> DocumentOut:
        return await asyncio.to_thread(self.retriever.get, doc_id, collection)

    async def delete(self, doc_id: str, collection: str | None) -> None:
        async with self._write:
            await asyncio.to_thread(self.retriever.delete, doc_id, collection)

    async def count(self, collection: str | None = None) -> int:
        return await asyncio.to_thread(self.retriever.count, collection)

    def info(self) -> list[ModelInfo]:
        return self.retriever.info()

    def ready(self) -> bool:
        return True

    def __del__(self) -> None:
        retriever = getattr(self, "retriever", None)
        if retriever is not None:
            retriever.close()


@serve.deployment(name="Reader")
class ReaderDeployment:
    def __init__(self, engine: dict[str, Any], batch: dict[str, Any]) -> None:
        from qaserve.deployments.reader import Reader

        cfg = _engine_cfg(engine)
        self.reader = Reader(cfg.reader, cfg.cache_dir, threads=replica_threads())
        opts = BatchOptions.model_validate(batch)
        self.batch_sizes = _batch_histogram("reader")
        self.read.set_max_batch_size(opts.max_batch_size)
        self.read.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def read(self, requests: list[ReadRequest]) -> list[ReadResponse]:
        """The windows of concurrent requests go through one ONNX Runtime run."""
        self.batch_sizes.observe(len(requests))
        return await asyncio.to_thread(self.reader.read_batch, requests)

    def info(self) -> ModelInfo:
        return self.reader.info()

    def ready(self) -> bool:
        return True


@serve.deployment(name="Generator")
class GeneratorDeployment:
    def __init__(self, engine: dict[str, Any]) -> None:
        from qaserve.deployments.generator import RagTokenGenerator

        cfg = _engine_cfg(engine)
        self.generator = RagTokenGenerator(cfg.generator, threads=replica_threads())

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        return await asyncio.to_thread(
            self.generator.generate,
            request.question,
            request.documents,
            request.max_new_tokens,
            request.num_beams,
        )

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GeneratedToken]:
        """Tokens as they are decided; each step runs off the event loop."""
        it = self.generator.stream(request.question, request.documents, request.max_new_tokens)
        done = object()
        while True:
            token = await asyncio.to_thread(next, it, done)
            if token is done:
                return
            yield token

    def weights(self, documents: list[ReadDocument]) -> list[float]:
        return self.generator.log_prior(documents).exp().tolist()

    def info(self) -> ModelInfo:
        return self.generator.info()

    def ready(self) -> bool:
        return True


@serve.deployment(name="Ensemble")
class EnsembleDeployment:
    def __init__(self, engine: dict[str, Any]) -> None:
        from qaserve.deployments.ensemble import Ensemble

        self.ensemble = Ensemble(_engine_cfg(engine).ensemble)

    def combine(
        self, mode: str, read: ReadResponse | None, generated: GenerateResponse | None
    ) -> FinalAnswer:
        return self.ensemble.combine(mode, read, generated)  # type: ignore[arg-type]

    def ready(self) -> bool:
        return True


# --- the ingress: the HTTP app over handles ---------------------------------------------------


async def _call(response: Awaitable[T]) -> T:
    """Await a handle call, turning Ray's failures into the API's errors."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    try:
        return await response
    except sex.BackPressureError as exc:
        raise Overloaded(f"a stage is at capacity: {exc}") from None
    except sex.DeploymentUnavailableError as exc:
        raise Overloaded(f"a stage is unavailable: {exc}") from None
    except rex.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, QAServeError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise BadRequest(str(cause)) from None
        if isinstance(cause, asyncio.TimeoutError | TimeoutError):
            raise StageTimeout("a stage timed out") from None
        raise
    except (rex.ActorDiedError, rex.ActorUnavailableError) as exc:
        raise Overloaded(
            f"a replica was lost and is being replaced ({type(exc).__name__})"
        ) from None


class RayBackend:
    """The `Backend` of serve/api.py over the stage handles."""

    def __init__(
        self,
        retriever: DeploymentHandle,
        reader: DeploymentHandle,
        generator: DeploymentHandle,
        ensemble: DeploymentHandle,
        embedder: DeploymentHandle,
    ) -> None:
        self.retriever, self.reader, self.generator = retriever, reader, generator
        self.ensemble, self.embedder = ensemble, embedder

    async def ingest(self, request: IngestRequest) -> IngestResponse:
        return await _call(self.retriever.ingest.remote(request))

    async def get_document(self, doc_id: str, collection: str | None = None) -> DocumentOut:
        return await _call(self.retriever.get.remote(doc_id, collection))

    async def delete_document(self, doc_id: str, collection: str | None = None) -> None:
        await _call(self.retriever.delete.remote(doc_id, collection))

    async def retrieve(self, request: RetrieveRequest) -> RetrieveResponse:
        docs = await _call(self.retriever.retrieve.remote(request))
        return RetrieveResponse(documents=docs)

    async def read(self, request: ReadRequest) -> ReadResponse:
        return await _call(self.reader.read.remote(request))

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        return await _call(self.generator.generate.remote(request))

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GeneratedToken]:
        gen = self.generator.options(stream=True).stream.remote(request)
        async for token in _stream(gen):
            yield token

    async def query(self, request: QueryRequest) -> QueryResponse:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        documents = await self._retrieve(request, timings)
        read: ReadResponse | None = None
        generated: GenerateResponse | None = None
        if documents:
            docs = as_read_documents(documents)
            jobs = []
            if request.mode in ("extractive", "ensemble"):
                jobs.append(
                    self._timed(
                        timings,
                        "reader",
                        self.reader.read.remote(self._read_request(request, docs)),
                    )
                )
            if request.mode in ("generative", "ensemble"):
                gen_req = GenerateRequest(
                    question=request.question, documents=docs, max_new_tokens=request.max_new_tokens
                )
                jobs.append(
                    self._timed(timings, "generator", self.generator.generate.remote(gen_req))
                )
            # Reader and generator consume the same documents concurrently.
            results = await asyncio.gather(*jobs)
            for r in results:
                if isinstance(r, ReadResponse):
                    read = r
                else:
                    generated = r
        return await self._respond(request, documents, read, generated, timings, start)

    async def query_events(self, request: QueryRequest) -> AsyncIterator[tuple[str, BaseModel]]:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        documents = await self._retrieve(request, timings)
        yield "documents", RetrieveResponse(documents=documents)
        docs = as_read_documents(documents)
        read_task = None
        if request.mode in ("extractive", "ensemble"):
            if docs:
                read_task = asyncio.ensure_future(
                    self._timed(
                        timings,
                        "reader",
                        self.reader.read.remote(self._read_request(request, docs)),
                    )
                )
            else:
                yield "answers", ReadResponse(answers=[])
        generated: GenerateResponse | None = None
        read: ReadResponse | None = None
        if read_task is not None:
            read = await read_task
            yield "answers", read
        if docs and request.mode in ("generative", "ensemble"):
            gen_req = GenerateRequest(
                question=request.question, documents=docs, max_new_tokens=request.max_new_tokens
            )
            tokens: list[GeneratedToken] = []
            t0 = time.perf_counter()
            async for token in _stream(self.generator.options(stream=True).stream.remote(gen_req)):
                tokens.append(token)
                yield "token", token
            timings["generator"] = round((time.perf_counter() - t0) * 1000, 3)
            weights = await _call(self.generator.weights.remote(docs))
            generated = GenerateResponse(
                text="".join(t.text for t in tokens), tokens=tokens, document_weights=weights
            )
        yield "answer", await self._respond(request, documents, read, generated, timings, start)

    async def models(self) -> ModelsResponse:
        retr, reader, gen = await asyncio.gather(
            _call(self.retriever.info.remote()),
            _call(self.reader.info.remote()),
            _call(self.generator.info.remote()),
        )
        return ModelsResponse(models=[*retr, reader, gen])

    async def ready(self) -> dict[str, bool]:
        names = ("retriever", "embedder", "reader", "generator", "ensemble")
        handles = (self.retriever, self.embedder, self.reader, self.generator, self.ensemble)

        async def one(h: DeploymentHandle) -> bool:
            try:
                return bool(await asyncio.wait_for(_call(h.ready.remote()), 5))
            except Exception:
                return False

        states = await asyncio.gather(*(one(h) for h in handles))
        return dict(zip(names, states, strict=True))

    # helpers
    @staticmethod
    def _read_request(request: QueryRequest, docs: list[ReadDocument]) -> ReadRequest:
        return ReadRequest(
            question=request.question,
            documents=docs,
            top_k=request.top_k_reader,
            handle_impossible_answer=True,
        )

    @staticmethod
    async def _timed(timings: dict[str, float], stage: str, response: Awaitable[T]) -> T:
        t0 = time.perf_counter()
        try:
            return await _call(response)
        finally:
            timings[stage] = round((time.perf_counter() - t0) * 1000, 3)

    async def _retrieve(
        self, request: QueryRequest, timings: dict[str, float]
    ) -> list[RetrievedDocument]:
        rr = RetrieveRequest(
            query=request.question,
            top_k=request.top_k_retriever,
            filters=request.filters,
            collection=request.collection,
            retrieval=request.retrieval,
        )
        return await self._timed(timings, "retriever", self.retriever.retrieve.remote(rr))

    async def _respond(
        self,
        request: QueryRequest,
        documents: list[RetrievedDocument],
        read: ReadResponse | None,
        generated: GenerateResponse | None,
        timings: dict[str, float],
        start: float,
    ) -> QueryResponse:
        if documents:
            answer = await self._timed(
                timings, "ensemble", self.ensemble.combine.remote(request.mode, read, generated)
            )
        else:
            answer = FinalAnswer(text="", source="none", score=0.0)
        return query_response(documents, answer, read, generated, timings, start)


async def _stream(gen: Any) -> AsyncIterator[Any]:
    it = gen.__aiter__()
    while True:
        try:
            item = await _call(it.__anext__())
        except StopAsyncIteration:
            return
        yield item


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress(RayBackend):
    def __init__(
        self,
        server: dict[str, Any],
        retriever: DeploymentHandle,
        reader: DeploymentHandle,
        generator: DeploymentHandle,
        ensemble: DeploymentHandle,
        embedder: DeploymentHandle,
    ) -> None:
        super().__init__(retriever, reader, generator, ensemble, embedder)
        self.server_cfg = ServerConfig.model_validate(server)

    def __serve_build_asgi_app__(self) -> Any:
        from qaserve.api import build_app

        app = build_app(None, self.server_cfg)
        app.state.backend = self
        return app


# --- building the application ------------------------------------------------------------------


def build_graph(cfg: GraphConfig) -> Any:
    """The bound application; `serve.run(build_graph(cfg))` or `serve run qaserve.graph:app`."""
    engine = cfg.engine.model_dump(mode="json")
    server = cfg.server.model_dump(mode="json")
    opts = {name: cfg.stages[name].serve_options() for name in STAGES}
    batch = {k: v.model_dump() for k, v in cfg.batching.items()}
    embedder = EmbedderDeployment.options(**opts["Embedder"]).bind(
        engine, batch.get("Embedder", {})
    )
    retriever = RetrieverDeployment.options(**opts["Retriever"]).bind(engine, embedder)
    reader = ReaderDeployment.options(**opts["Reader"]).bind(engine, batch.get("Reader", {}))
    generator = GeneratorDeployment.options(**opts["Generator"]).bind(engine)
    ensemble = EnsembleDeployment.options(**opts["Ensemble"]).bind(engine)
    return Ingress.options(**opts["Ingress"]).bind(
        server, retriever, reader, generator, ensemble, embedder
    )


def app(args: dict[str, Any]) -> Any:
    """Application builder for Serve config files: `import_path: qaserve.graph:app`.

    `args.config` names a qaserve graph YAML (a path on the cluster, or one of the packaged
    configs); `args.graph` carries the graph inline instead (what `qaserve deploy` sends, so
    the file need not exist on the cluster); `args.data_dir` overrides the store folder.
    """
    from qaserve.server import resolve_config

    overrides = {}
    if args.get("data_dir"):
        overrides["data_dir"] = args["data_dir"]
    if args.get("graph") is not None:
        return build_graph(GraphConfig.from_data(args["graph"], **overrides))
    return build_graph(GraphConfig.load(resolve_config(args.get("config")), **overrides))
