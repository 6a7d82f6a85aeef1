"""The same requests through the in-process transport and the Ray Serve graph, over HTTP: the
same answers, the same errors and statuses, the same stream events, the same /readyz keys.

Both run the one pipeline (qaserve.pipeline) on the same tiny models, configured with
non-default generator and reader settings, so a transport that drops the server's configured
values (the drifts this replaced: beam search in-process but greedy on Ray, max_new_tokens
and max_answer_len pinned by the wire schema's defaults) answers differently here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ray = pytest.importorskip("ray")

DOCS = [
    {
        "id": "r1",
        "text": "The sound quality is excellent and the bass is deep.",
        "meta": {"item_id": "A"},
    },
    {
        "id": "r2",
        "text": "Battery life is about twelve hours on one charge.",
        "meta": {"item_id": "A"},
    },
    {
        "id": "r3",
        "text": "The screen scratches easily and the case feels cheap.",
        "meta": {"item_id": "B"},
    },
]
NUM_BEAMS, MAX_NEW_TOKENS, MAX_ANSWER_LEN = 2, 5, 3
# Both servers need a key: the Ray ingress receives it as a digest in its args, so this also
# checks that the digest it is given authenticates the key.
KEY = {"X-API-Key": "parity-key-0001"}


def _configured(engine: Any, data_dir: Path) -> Any:
    return engine.model_copy(
        update={
            "data_dir": data_dir,
            "generator": engine.generator.model_copy(
                update={"num_beams": NUM_BEAMS, "max_new_tokens": MAX_NEW_TOKENS}
            ),
            "reader": engine.reader.model_copy(update={"max_answer_len": MAX_ANSWER_LEN}),
        }
    )


@pytest.fixture(scope="module")
def urls(
    tiny_engine_config: Any, tmp_path_factory: pytest.TempPathFactory, serve_app: Any
) -> Iterator[dict[str, str]]:
    from ray import serve

    from qaserve.config import ApiKey, ServerConfig
    from qaserve.runtime.api import build_app
    from qaserve.runtime.graph import build_graph
    from qaserve.runtime.graph_config import APP_NAME, GraphConfig, StageOptions
    from qaserve.runtime.local import local_pipeline
    from qaserve.runtime.server import free_port
    from qaserve.stages import DEPLOYMENTS

    root = tmp_path_factory.mktemp("parity")
    server = ServerConfig(api_keys=[ApiKey(key=KEY["X-API-Key"], write=True)])
    local = local_pipeline(_configured(tiny_engine_config, root / "local"), workers=2)
    stages = {
        name: StageOptions(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
        for name in DEPLOYMENTS
    }
    cfg = GraphConfig(
        engine=_configured(tiny_engine_config, root / "graph"), server=server, stages=stages
    )
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_graph(cfg), name=APP_NAME, route_prefix="/")
        found = {"local": serve_app(build_app(local, server)), "ray": f"http://127.0.0.1:{port}"}
        for url in found.values():
            docs = {"documents": DOCS}
            r = httpx.post(f"{url}/v1/documents", json=docs, headers=KEY, timeout=120)
            assert r.status_code == 200, r.text
        yield found
    finally:
        serve.shutdown()
        ray.shutdown()
        local.close()


def _normal(value: Any) -> Any:
    """What must agree: everything but timing values (their keys must), floats to 4 places."""
    if isinstance(value, dict):
        return {k: sorted(v) if k == "timings_ms" else _normal(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


def _outcome(url: str, method: str, path: str, body: Any = None, key: bool = True) -> Any:
    # As JSON text with ASCII escapes: a lone surrogate ("\ud800") is valid JSON, not UTF-8.
    content = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", **(KEY if key else {})}
    with httpx.Client(base_url=url, timeout=120) as http:
        r = http.request(method, path, content=content, headers=headers)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        from qaserve_client.sse import SSEDecoder

        events = [(e.event, _normal(json.loads(e.data))) for e in SSEDecoder().feed(r.text)]
        return r.status_code, events
    payload: Any = r.json() if r.content else None
    if path == "/v1/models":  # each transport has its own store folder
        payload["models"] = [m | {"model": m["stage"]} for m in payload["models"]]
    if r.status_code >= 400:
        error = payload["error"]
        return r.status_code, error["type"], error.get("field")
    return r.status_code, _normal(payload)


Q = "How is the sound?"
READ_DOC = [{"id": "r1", "text": DOCS[0]["text"], "score": 0.5}]
CASES: dict[str, tuple[str, str, Any]] = {
    "query-extractive": ("POST", "/v1/query", {"question": Q, "mode": "extractive"}),
    "query-ensemble": ("POST", "/v1/query", {"question": Q, "filters": {"item_id": "A"}}),
    "query-generative": ("POST", "/v1/query", {"question": Q, "mode": "generative"}),
    "query-sparse": ("POST", "/v1/query", {"question": "battery", "retrieval": "sparse"}),
    "query-hybrid-any-of": (
        "POST",
        "/v1/query",
        {"question": Q, "retrieval": "hybrid", "filters": {"item_id": ["A", "B"]}},
    ),
    "query-empty-collection": ("POST", "/v1/query", {"question": Q, "collection": "nothing"}),
    "query-settings": (
        "POST",
        "/v1/query",
        {"question": Q, "num_beams": 1, "max_new_tokens": 2, "max_answer_len": 5},
    ),
    "stream-ensemble": ("POST", "/v1/query", {"question": Q, "stream": True}),
    "stream-extractive": (
        "POST",
        "/v1/query",
        {"question": Q, "mode": "extractive", "stream": True},
    ),
    "stream-generative": (
        "POST",
        "/v1/query",
        {"question": Q, "mode": "generative", "stream": True},
    ),
    "stream-no-documents": (
        "POST",
        "/v1/query",
        {"question": Q, "collection": "nothing", "stream": True},
    ),
    "retrieve": (
        "POST",
        "/v1/retrieve",
        {"query": "battery", "top_k": 2, "filters": {"item_id": "A"}},
    ),
    "read": ("POST", "/v1/read", {"question": Q, "documents": READ_DOC}),
    "generate": ("POST", "/v1/generate", {"question": Q, "documents": READ_DOC}),
    "generate-stream": (
        "POST",
        "/v1/generate",
        {"question": Q, "documents": READ_DOC, "stream": True},
    ),
    "get": ("GET", "/v1/documents/r2", None),
    "models": ("GET", "/v1/models", None),
    # errors
    "blank-question": ("POST", "/v1/query", {"question": "  "}),
    "unknown-field": ("POST", "/v1/query", {"question": Q, "beams": 2}),
    "too-many-documents-to-generate": ("POST", "/v1/query", {"question": Q, "top_k_retriever": 21}),
    # Refused at the edge since issue 14 (they reached a stage before); a stage's own error
    # crossing the Ray hop as itself is what unknown-document / unknown-operation show.
    "collection-escaping-the-data-dir": (
        "POST",
        "/v1/retrieve",
        {"query": Q, "collection": "a/../b"},
    ),
    "lone-surrogate-to-read": (
        "POST",
        "/v1/read",
        {"question": Q, "documents": [{"text": "a \ud800 b"}]},
    ),
    "lone-surrogate-in-a-stream": (
        "POST",
        "/v1/generate",
        {"question": Q, "documents": [{"text": "a \ud800 b"}], "stream": True},
    ),
    "unknown-document": ("GET", "/v1/documents/nope", None),
    "unknown-operation": ("GET", "/v1/operations/nope", None),
    # cost bounds (qaserve.limits), derived from the engine each transport runs: 20 documents
    # x beams x (max_doc_tokens 64 + 5 question tokens) against 20 x 2 beams x (64 + 64)
    "question-over-its-bound": ("POST", "/v1/query", {"question": "How is the sound? " * 100}),
    "beams-over-the-budget": (
        "POST",
        "/v1/generate",
        {"question": Q, "documents": READ_DOC * 20, "num_beams": 4},
    ),
    "beams-within-the-budget": (
        "POST",
        "/v1/generate",
        {"question": Q, "documents": READ_DOC * 20, "num_beams": 3},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_both_transports_answer_alike(urls: dict[str, str], case: str) -> None:
    method, path, body = CASES[case]
    local = _outcome(urls["local"], method, path, body)
    graph = _outcome(urls["ray"], method, path, body)
    assert local == graph


@pytest.mark.parametrize(
    ("case", "field"),
    [("question-over-its-bound", "question"), ("beams-over-the-budget", "num_beams")],
)
def test_both_transports_bound_the_cost(urls: dict[str, str], case: str, field: str) -> None:
    """Finding 6 on both transports: the Ray Ingress checks the bounds its engine implies."""
    method, path, body = CASES[case]
    local = _outcome(urls["local"], method, path, body)
    assert local == _outcome(urls["ray"], method, path, body) == (422, "validation_error", field)
    within = CASES["beams-within-the-budget"]
    assert _outcome(urls["ray"], *within)[0] == 200  # the Ingress derived it from the engine


@pytest.mark.parametrize("case", ["get", "query-extractive", "retrieve"])
def test_both_transports_refuse_a_request_without_a_key(urls: dict[str, str], case: str) -> None:
    method, path, body = CASES[case]
    local = _outcome(urls["local"], method, path, body, key=False)
    assert local == _outcome(urls["ray"], method, path, body, key=False)
    assert local == (401, "unauthorized", None)


def test_the_same_readiness_keys(urls: dict[str, str]) -> None:
    from qaserve.stages import STAGES

    keys = [list(httpx.get(f"{u}/readyz", timeout=30).json()["stages"]) for u in urls.values()]
    assert keys[0] == keys[1] == [s.name for s in STAGES]


@pytest.mark.parametrize("transport", ["local", "ray"])
def test_configured_values_apply_when_the_request_leaves_them_unset(
    urls: dict[str, str], transport: str
) -> None:
    """Drifts: the graph decoded greedily with `generator.num_beams: 2`, generated 48 tokens
    whatever `generator.max_new_tokens`, and /v1/read ignored `reader.max_answer_len`."""
    url = urls[transport]
    query = _outcome(url, "POST", "/v1/query", {"question": Q, "mode": "generative"})[1]
    docs = [{"id": d["id"], "text": d["text"], "score": d["score"]} for d in query["documents"]]
    explicit = {
        "question": Q,
        "documents": docs,
        "num_beams": NUM_BEAMS,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    generated = _outcome(url, "POST", "/v1/generate", explicit)[1]
    assert query["generated"]["tokens"] == generated["tokens"]
    assert len(generated["tokens"]) <= MAX_NEW_TOKENS
    unset = {"question": Q, "documents": READ_DOC, "top_k": 5}
    read = _outcome(url, "POST", "/v1/read", unset)[1]
    assert read == _outcome(url, "POST", "/v1/read", {**unset, "max_answer_len": MAX_ANSWER_LEN})[1]


@pytest.mark.parametrize("transport", ["local", "ray"])
def test_a_stream_reports_what_the_plain_query_reports(
    urls: dict[str, str], transport: str
) -> None:
    body = {"question": Q, "filters": {"item_id": "A"}}
    plain = _outcome(urls[transport], "POST", "/v1/query", body)[1]
    events = _outcome(urls[transport], "POST", "/v1/query", {**body, "stream": True})[1]
    assert [e for e, _ in events][:2] == ["documents", "answers"]
    final = dict(events)["answer"]
    assert final == plain  # beam search included: the tokens arrive when the search ends
    assert final["timings_ms"] == ["ensemble", "generator", "reader", "retriever", "total"]


def test_an_asynchronous_write_lands_alike(urls: dict[str, str]) -> None:
    """POST ?wait=false: 202 and an operation on both transports, polled to `done` with the
    same result and progress; the document is there after."""
    import time

    text = "Battery life is about twelve hours on one charge. It charges over USB-C in an hour."
    docs = [{"id": "async-1", "text": text}]
    outcomes = {}
    for name, url in urls.items():
        with httpx.Client(base_url=url, headers=KEY, timeout=120) as http:
            r = http.post("/v1/documents", params={"wait": "false"}, json={"documents": docs})
            assert r.status_code == 202, (name, r.text)
            location = r.headers["location"]
            deadline = time.monotonic() + 120
            op = r.json()
            while op["status"] in ("queued", "running") and time.monotonic() < deadline:
                time.sleep(0.1)
                op = http.get(location).json()
            assert http.get("/v1/documents/async-1").status_code == 200
        outcomes[name] = (op["status"], op["result"], op["progress"], op["error"])
    assert outcomes["local"] == outcomes["ray"]
    assert outcomes["ray"][0] == "done"
