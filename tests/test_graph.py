"""The real Ray Serve graph on local Ray with tiny models, driven through the SDK and raw HTTP.

One application for the module (Ray takes ~20 s to start on 2 cores): routes, streaming,
idempotent ingest, overload as 503 + Retry-After from an inner stage's queue limit, and a
killed replica after which requests succeed again with no stored document lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def graph(tiny_engine_config: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from qaserve.runtime.graph import build_graph
    from qaserve.runtime.graph_config import APP_NAME, GraphConfig, StageOptions
    from qaserve.runtime.server import free_port

    stages = {
        "Ingress": StageOptions(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64),
        "Retriever": StageOptions(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16),
        "Embedder": StageOptions(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16),
        "Reader": StageOptions(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=8),
        # A tiny queue on the generator: overload must surface as 503, not 500.
        "Generator": StageOptions(
            ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1, max_queued_requests=1
        ),
    }
    # Its own store: the in-process API tests keep the session's Edge shard open, and a
    # shard has one owner.
    engine = tiny_engine_config.model_copy(update={"data_dir": tmp_path_factory.mktemp("graph")})
    cfg = GraphConfig(engine=engine, stages=stages)
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_graph(cfg), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


DOCS: list[dict[str, Any]] = [
    {
        "id": "r1",
        "text": "The sound quality is excellent and the bass is deep.",
        "meta": {"item_id": "A"},
    },
    {
        "id": "r2",
        "text": "Battery life is about twelve hours on a single charge.",
        "meta": {"item_id": "A"},
    },
    {
        "id": "r3",
        "text": "The screen scratches easily and the case feels cheap.",
        "meta": {"item_id": "B"},
    },
]


def test_routes_through_the_sdk(graph: str) -> None:
    from qaserve_client.client import Client

    with Client(graph, timeout=120) as client:
        assert client.ready().ready
        first = client.ingest(DOCS)
        again = client.ingest(DOCS)  # idempotent by id
        assert first.ids == again.ids == ["r1", "r2", "r3"]
        assert client.get_document("r2").text == DOCS[1]["text"]

        hits = client.retrieve("How long does the battery last?", top_k=2, filters={"item_id": "A"})
        assert hits.documents and all(d.meta["item_id"] == "A" for d in hits.documents)
        assert hits.documents[0].id == "r2"
        assert {
            d.id for d in client.retrieve("screen", top_k=5, filters={"item_id": ["B"]}).documents
        } == {"r3"}

        read = client.read("How is the bass?", [DOCS[0]["text"]], top_k=2)
        for a in read.answers:
            assert DOCS[0]["text"][a.start : a.end] == a.answer

        resp = client.query(
            "How is the sound?", mode="ensemble", filters={"item_id": "A"}, max_new_tokens=4
        )
        assert resp.documents and resp.generated is not None
        assert {"retriever", "reader", "generator", "ensemble", "total"} <= set(resp.timings_ms)
        models = client.models()
        assert {m.stage for m in models} >= {"retriever", "reader", "generator"}


def test_streaming_query_events_in_order(graph: str) -> None:
    from qaserve_client.client import Client

    with Client(graph, timeout=120) as client:
        client.ingest(DOCS)
        events = [e for e, _ in client.query_stream("How is the sound?", max_new_tokens=3)]
    assert events[0] == "documents" and events[1] == "answers"
    assert events[-1] == "answer"
    assert 1 <= events.count("token") <= 3


def test_errors_over_raw_http(graph: str) -> None:
    with httpx.Client(base_url=graph, timeout=60) as http:
        r = http.post(
            "/v1/query", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error"
        r = http.post("/v1/query", json={"question": "   "})
        assert r.status_code == 422 and r.json()["error"]["field"] == "question"
        r = http.post("/v1/query", json={"question": "ok", "top_k_retriever": "many"})
        assert r.status_code == 422
        r = http.get("/v1/documents/no-such-id")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        r = http.post("/v1/documents", content=b"x" * (9 * 2**20))
        assert r.status_code == 413


def test_overload_of_an_inner_stage_is_503_with_retry_after(graph: str) -> None:
    body = {
        "question": "How is the sound?",
        "documents": [{"text": DOCS[0]["text"]}],
        "max_new_tokens": 24,
    }

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=graph, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/generate", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert 200 in codes, codes
    assert 503 in codes, codes
    assert set(codes) <= {200, 503}, codes
    shed = next(r for r in responses if r.status_code == 503)
    assert shed.json()["error"]["type"] == "overloaded"
    assert int(shed.headers["retry-after"]) >= 0


def _replica_names(deployment: str) -> set[tuple[str, str]]:
    named = ray.util.list_named_actors(all_namespaces=True)
    return {
        (a["name"], a["namespace"])
        for a in named
        if a["name"].startswith("SERVE_REPLICA") and f"#{deployment}#" in a["name"]
    }


@pytest.mark.parametrize("stage", ["Reader", "Retriever"])
def test_killed_replica_recovers_without_losing_documents(graph: str, stage: str) -> None:
    from qaserve_client.client import Client

    with Client(graph, timeout=120) as client:
        client.ingest(DOCS)
        before = {d["id"]: client.get_document(d["id"]).text for d in DOCS}
        killed = _replica_names(stage)
        assert killed, f"no {stage} replica found"
        for name, namespace in killed:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        deadline = time.monotonic() + 180
        failures = 0
        while True:
            try:
                resp = client.query(
                    "How is the sound?", mode="extractive", filters={"item_id": "A"}
                )
                break
            except Exception:
                failures += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        assert resp.documents
        print(f"{stage}: {failures} failed requests while the replica was replaced")
        # Serve replaced the killed replica with a new one (a new name).
        while not (_replica_names(stage) - killed) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _replica_names(stage) - killed
        after = {d["id"]: client.get_document(d["id"]).text for d in DOCS}
        assert after == before
