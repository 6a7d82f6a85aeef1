"""The one pipeline, the stage registry and the error vocabulary, without Ray: the mapping of
stage failures both transports share, the registry's readings, and a streamed query that
reads while the generator decodes (real tiny stages, recorded as they are called)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from qaserve import errors
from qaserve.errors import BadRequest, InternalError, QAServeError, StageTimeout, as_api_error
from qaserve.pipeline import Pipeline
from qaserve.runtime.graph_config import GraphConfig
from qaserve.stages import BY_NAME, DEPLOYMENTS, STAGES, with_needs
from qaserve_client.errors import ERROR_TYPES, error_from_body
from qaserve_client.schema import QueryRequest

# --- errors: one vocabulary, one mapping -----------------------------------------------------


def test_every_server_error_type_is_on_the_wire_with_its_status() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type)]
    found = [c for c in classes if issubclass(c, QAServeError)]
    assert len(found) >= 10
    for cls in found:
        assert ERROR_TYPES[cls.type] == cls.status, cls
        # what the SDK makes of it inside a stream, where no HTTP status comes along
        assert error_from_body(None, cls("x").to_dict()).status == cls.status


def test_a_stage_error_maps_alike_whatever_the_transport() -> None:
    """Drift: a ValueError from a stage was a 400 through Ray and a 500 in-process."""
    assert isinstance(as_api_error(ValueError("bad top_k"), "read"), BadRequest)
    assert isinstance(as_api_error(TimeoutError(), "read", 5.0), StageTimeout)
    assert isinstance(as_api_error(TypeError("bug"), "read"), InternalError)
    own = BadRequest("no", "field")
    assert as_api_error(own, "read") is own


def test_the_ray_transport_hands_over_the_stage_exception_itself() -> None:
    rex = pytest.importorskip("ray.exceptions")
    from qaserve.runtime.ingress import call

    async def failing() -> None:
        raise rex.RayTaskError("read", "Traceback ...", ValueError("bad input"))

    with pytest.raises(ValueError, match="bad input"):
        asyncio.run(call(failing()))
    field_kept = BadRequest("no", "collection")
    import pickle

    assert pickle.loads(pickle.dumps(field_kept)).field == "collection"


# --- the registry ------------------------------------------------------------------------------


def test_the_registry_drives_the_graph_config() -> None:
    cfg = GraphConfig()
    assert list(cfg.stages) == list(DEPLOYMENTS)
    assert set(cfg.batching) == {s.deployment for s in STAGES if s.batch is not None}
    for s in STAGES:
        assert cfg.stages[s.deployment].ray_actor_options["num_cpus"] == s.num_cpus
        assert hasattr(cfg.engine, s.config)
    with pytest.raises(ValueError, match="ensemble runs inside the pipeline"):
        GraphConfig.model_validate({"stages": {"Ensemble": {}}})
    with pytest.raises(ValueError, match="only"):
        GraphConfig.model_validate({"batching": {"Generator": {"max_batch_size": 4}}})


def test_threads_are_ours_not_serves() -> None:
    cfg = GraphConfig.model_validate({"stages": {"Reader": {"threads": 2}}})
    assert cfg.stages["Reader"].threads == 2
    assert "threads" not in cfg.stages["Reader"].serve_options()


def test_needs_come_first() -> None:
    assert [s.name for s in with_needs(["retriever"])] == ["embedder", "retriever"]
    for s in STAGES:  # the builder binds in registry order: needs must be bound before
        assert all(STAGES.index(BY_NAME[n]) < STAGES.index(s) for n in s.needs)


def test_model_sections_follow_the_registry(tiny_engine_config: Any) -> None:
    sections = tiny_engine_config.model_sections()
    assert [type(s).__name__ for s in sections] == [
        "EmbedderConfig",
        "ReaderConfig",
        "GeneratorConfig",
    ]


# --- a streamed query reads while the generator decodes ----------------------------------------


class Recorded:
    """The real in-process stages, with the time each call starts and ends written down."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.log: list[tuple[str, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read(self, request: Any) -> Any:
        self.log.append(("read:start", time.perf_counter()))
        await asyncio.sleep(0.3)  # a slow reader: the generator must not wait for it
        try:
            return await self.inner.read(request)
        finally:
            self.log.append(("read:end", time.perf_counter()))

    async def generate_stream(self, request: Any) -> AsyncIterator[Any]:
        self.log.append(("generate:start", time.perf_counter()))
        async for token in self.inner.generate_stream(request):
            self.log.append(("token", time.perf_counter()))
            yield token


@pytest.mark.slow
def test_a_streamed_query_reads_and_generates_at_the_same_time(tiny_engine_config: Any) -> None:
    """Drift: on Ray a streamed query read, then generated; a plain query ran both at once."""
    from qaserve.runtime.local import LocalStages
    from qaserve_client.schema import DocumentIn, IngestRequest

    cfg = tiny_engine_config.model_copy(update={"data_dir": tiny_engine_config.data_dir / "rec"})
    stages = LocalStages(cfg, workers=4, preload=False)
    recorded = Recorded(stages)
    pipeline = Pipeline(recorded, cfg.ensemble)

    async def run() -> list[str]:
        docs = [DocumentIn(id="a", text="The bass is deep and the sound is clear.")]
        await pipeline.ingest(IngestRequest(documents=docs))
        request = QueryRequest(question="How is the bass?", max_new_tokens=3)
        return [name async for name, _ in pipeline.query_events(request)]

    try:
        events = asyncio.run(run())
    finally:
        stages.close()
    assert events[:2] == ["documents", "answers"] and events[-1] == "answer"
    times = dict(reversed(recorded.log))  # the first time of each name
    assert times["generate:start"] < times["read:end"]
    assert times["token"] < times["read:end"]  # the first token was decoded during the read
