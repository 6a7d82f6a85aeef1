"""The v1 HTTP API over real HTTP: uvicorn on a free port, the tiny engine behind it.

Raw httpx here (the wire contract: status codes, error bodies, SSE framing); the SDK has its
own tests in test_client.py. Error paths that need a failing or slow graph use
`FaultyBackend`, the real backend with scripted faults in front of it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import httpx
import pytest
from tiny_models import FaultyBackend

from qaserve.config import ApiKey, ServerConfig
from qaserve.errors import DocumentNotFound, Overloaded
from qaserve.runtime.api import build_app
from qaserve.stages import STAGES
from qaserve.threads import iterate_blocking
from qaserve_client.schema import (
    GeneratedToken,
    GenerateResponse,
    QueryResponse,
    ReadResponse,
    RetrieveResponse,
)
from qaserve_client.sse import SSEDecoder

pytestmark = pytest.mark.slow  # the retriever is the real packaged MiniLM

QUESTION = "How long does the battery last?"
REVIEWS: list[dict[str, Any]] = [
    {
        "id": "battery",
        "text": "The battery lasts about ten hours on a single charge.",
        "meta": {"item_id": "laptop"},
    },
    {
        "id": "screen",
        "text": "The screen is bright and sharp, even outdoors.",
        "meta": {"item_id": "laptop"},
    },
    {
        "id": "hotel",
        "text": "The hotel room was clean and the staff were friendly.",
        "meta": {"item_id": "hotel"},
    },
]


@pytest.fixture(scope="module")
def http(api_server: Any) -> Iterator[httpx.Client]:
    """Sends the read key (every route but the probes and docs needs a key); a request's own
    `Authorization: Bearer` (the write key) takes precedence over it."""
    headers = {"X-API-Key": api_server.read_key}
    with httpx.Client(base_url=api_server.url, timeout=60, headers=headers) as client:
        yield client


@pytest.fixture(scope="module")
def writer(api_server: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_server.write_key}"}


@pytest.fixture(scope="module")
def reviews(http: httpx.Client, writer: dict[str, str]) -> str:
    """A collection holding REVIEWS."""
    response = http.post(
        "/v1/documents", json={"collection": "api", "documents": REVIEWS}, headers=writer
    )
    assert response.status_code == 200, response.text
    return "api"


def events(response: httpx.Response) -> list[tuple[str, Any]]:
    assert response.headers["content-type"].startswith("text/event-stream")
    decoded = SSEDecoder().feed(response.text)
    return [(e.event, json.loads(e.data)) for e in decoded]


def assert_error(response: httpx.Response, status: int, type_: str, field: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_
    assert error["message"]
    assert error.get("field") == field
    return error


# --- routes ------------------------------------------------------------------------------------


def test_openapi_documents_every_route(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert set(paths) >= {
        "/v1/documents",
        "/v1/documents/{doc_id}",
        "/v1/retrieve",
        "/v1/read",
        "/v1/generate",
        "/v1/query",
        "/v1/models",
        "/healthz",
        "/readyz",
    }
    assert set(paths["/v1/documents/{doc_id}"]) == {"get", "delete"}
    assert "text/event-stream" in paths["/v1/query"]["post"]["responses"]["200"]["content"]
    assert http.get("/docs").status_code == 200


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    stages = ready.json()["stages"]
    assert ready.json()["ready"] is True
    assert list(stages) == [s.name for s in STAGES]  # the registry, in order


def test_readiness_is_503_while_a_stage_is_down(api_server: Any, serve_app: Any) -> None:
    class HalfReady(FaultyBackend):
        async def ready(self) -> dict[str, bool]:
            return {**await self.inner.ready(), "generator": False}

    backend = cast(Any, HalfReady(api_server.backend))  # a duck-typed Pipeline
    url = serve_app(build_app(backend, ServerConfig(api_keys=[])))
    response = httpx.get(f"{url}/readyz")
    assert response.status_code == 503
    assert response.json()["stages"]["generator"] is False
    assert response.json()["stages"]["reader"] is True


def test_document_lifecycle(http: httpx.Client, writer: dict[str, str]) -> None:
    doc = {"id": "shop/B01/r1", "text": "Arrived quickly, works well.", "meta": {"stars": 5}}
    ingested = http.post("/v1/documents", json={"documents": [doc]}, headers=writer)
    assert ingested.json() == {"ids": ["shop/B01/r1"], "passages": 1}
    path = "/v1/documents/shop%2FB01%2Fr1"
    got = http.get(path)
    assert got.status_code == 200
    assert got.json() == {"id": doc["id"], "text": doc["text"], "meta": doc["meta"]}
    assert http.delete(path, headers=writer).status_code == 204
    assert_error(http.get(path), 404, "not_found", "id")
    assert_error(http.delete(path, headers=writer), 404, "not_found", "id")


def test_collection_scopes_documents(http: httpx.Client, reviews: str) -> None:
    assert http.get("/v1/documents/battery", params={"collection": reviews}).status_code == 200
    assert_error(http.get("/v1/documents/battery"), 404, "not_found", "id")
    assert_error(
        http.get("/v1/documents/battery", params={"collection": "no spaces"}),
        422,
        "validation_error",
        "collection",
    )


def test_ingest_is_idempotent_by_id(http: httpx.Client, writer: dict[str, str]) -> None:
    body = {"collection": "api_idem", "documents": REVIEWS}
    first = http.post("/v1/documents", json=body, headers=writer).json()
    second = http.post("/v1/documents", json=body, headers=writer).json()
    assert first == second == {"ids": ["battery", "screen", "hotel"], "passages": 3}
    hits = http.post(
        "/v1/retrieve", json={"query": "battery", "top_k": 100, "collection": "api_idem"}
    ).json()["documents"]
    assert sorted(h["id"] for h in hits) == ["battery", "hotel", "screen"]


def test_retrieve_with_filters(http: httpx.Client, reviews: str) -> None:
    def ids(filters: dict[str, Any]) -> list[str]:
        body = {"query": "clean room", "top_k": 10, "filters": filters, "collection": reviews}
        response = http.post("/v1/retrieve", json=body)
        assert response.status_code == 200, response.text
        return sorted(d.id for d in RetrieveResponse.model_validate(response.json()).documents)

    assert ids({"item_id": "laptop"}) == ["battery", "screen"]
    assert ids({"item_id": "hotel"}) == ["hotel"]
    assert ids({"item_id": ["hotel", "laptop"]}) == ["battery", "hotel", "screen"]
    assert ids({"item_id": "nothing"}) == []


def test_read_returns_spans_of_the_documents(http: httpx.Client) -> None:
    docs = [{"id": d["id"], "text": d["text"]} for d in REVIEWS]
    response = http.post("/v1/read", json={"question": QUESTION, "documents": docs, "top_k": 2})
    assert response.status_code == 200, response.text
    answers = ReadResponse.model_validate(response.json()).answers
    assert 1 <= len(answers) <= 2
    texts = {d["id"]: d["text"] for d in docs}
    for a in answers:
        assert a.answer == texts[a.document_id][a.start : a.end]


def test_generate(http: httpx.Client) -> None:
    docs = [{"id": "a", "text": REVIEWS[0]["text"], "score": 0.9}, {"text": "Other.", "score": 0.1}]
    body = {"question": QUESTION, "documents": docs, "max_new_tokens": 4}
    response = GenerateResponse.model_validate(http.post("/v1/generate", json=body).json())
    assert 1 <= len(response.tokens) <= 4
    assert response.text == "".join(t.text for t in response.tokens)
    assert sum(response.document_weights) == pytest.approx(1.0)


def test_query_runs_the_graph(http: httpx.Client, reviews: str) -> None:
    body = {"question": QUESTION, "collection": reviews, "filters": {"item_id": "laptop"}}
    response = QueryResponse.model_validate(http.post("/v1/query", json=body).json())
    assert {d.id for d in response.documents} == {"battery", "screen"}
    assert response.generated is not None and response.generated.tokens
    assert {"retriever", "reader", "generator", "ensemble", "total"} <= set(response.timings_ms)
    assert response.answer.source in ("reader", "generator", "both", "none")


def test_models(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()["models"]
    stages = {m["stage"] for m in models}
    assert {"retriever", "reader", "generator"} <= stages
    reader = next(m for m in models if m["stage"] == "reader")
    assert "int8" in reader["format"]


# --- streaming ---------------------------------------------------------------------------------


def test_query_stream_events_in_order(http: httpx.Client, reviews: str) -> None:
    body = {"question": QUESTION, "collection": reviews, "max_new_tokens": 6, "stream": True}
    received = events(http.post("/v1/query", json=body))
    names = [name for name, _ in received]
    tokens = names.count("token")
    assert tokens >= 1
    assert names == ["documents", "answers", *["token"] * tokens, "answer", "done"]
    documents, answers, answer = received[0][1], received[1][1], received[-2][1]
    final = QueryResponse.model_validate(answer)
    assert RetrieveResponse.model_validate(documents).documents == final.documents
    spans = [a for a in ReadResponse.model_validate(answers).answers if a.answer]
    assert spans == final.answers
    streamed = [payload["id"] for name, payload in received if name == "token"]
    assert final.generated is not None
    assert [t.id for t in final.generated.tokens] == streamed
    # streaming decodes greedily, as the non-streaming query does with num_beams=1
    plain = http.post("/v1/query", json={**body, "stream": False}).json()
    assert [t["id"] for t in plain["generated"]["tokens"]] == streamed
    assert plain["answer"] == answer["answer"]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("extractive", ["documents", "answers", "answer", "done"]), ("generative", None)],
)
def test_query_stream_events_follow_the_mode(
    http: httpx.Client, reviews: str, mode: str, expected: list[str] | None
) -> None:
    body = {"question": QUESTION, "collection": reviews, "mode": mode, "stream": True}
    names = [name for name, _ in events(http.post("/v1/query", json={**body, "max_new_tokens": 3}))]
    if expected is None:  # generative: no reader, tokens instead
        expected = ["documents", *["token"] * names.count("token"), "answer", "done"]
        assert names.count("token") >= 1
    assert names == expected


def test_generate_stream_tokens_then_summary(http: httpx.Client) -> None:
    docs = [{"id": "a", "text": REVIEWS[0]["text"], "score": 2.0}, {"text": "Other.", "score": 1.0}]
    body = {"question": QUESTION, "documents": docs, "max_new_tokens": 5}
    received = events(http.post("/v1/generate", json={**body, "stream": True}))
    names = [name for name, _ in received]
    assert names[-2:] == ["generated", "done"] and set(names[:-2]) == {"token"}
    summary = GenerateResponse.model_validate(received[-2][1])
    assert [t.model_dump() for t in summary.tokens] == [p for n, p in received if n == "token"]
    assert summary.text == "".join(t.text for t in summary.tokens)
    plain = GenerateResponse.model_validate(http.post("/v1/generate", json=body).json())
    assert summary.tokens == plain.tokens
    assert summary.document_weights == pytest.approx(plain.document_weights)  # p(z|x)


def test_a_beam_search_stream_answers_what_generate_answers(http: httpx.Client) -> None:
    """Drift: a stream decoded greedily whatever num_beams; now its tokens are the beam
    search's, sent when the search ends."""
    docs = [{"text": "The bass is deep and the battery lasts long.", "score": 1.0}]
    body = {"question": QUESTION, "documents": docs, "num_beams": 2, "max_new_tokens": 6}
    plain = http.post("/v1/generate", json=body).json()
    received = events(http.post("/v1/generate", json={**body, "stream": True}))
    streamed = [payload["id"] for name, payload in received if name == "token"]
    assert streamed == [t["id"] for t in plain["tokens"]]
    greedy = http.post("/v1/generate", json={**body, "num_beams": 1}).json()
    assert plain["document_weights"] == greedy["document_weights"] == [1.0]


# --- bad requests --------------------------------------------------------------------------------


def test_malformed_json(http: httpx.Client) -> None:
    response = http.post(
        "/v1/query", content=b'{"question": "x",', headers={"content-type": "application/json"}
    )
    error = assert_error(response, 422, "validation_error")
    assert "JSON" in error["message"]
    assert_error(http.post("/v1/query"), 422, "validation_error")  # no body at all


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/retrieve", {"query": "x", "top_k": "many"}, "top_k"),
        ("/v1/retrieve", {"query": "x", "top_k": 0}, "top_k"),
        ("/v1/retrieve", {"query": "x", "topk": 3}, "topk"),  # unknown field
        ("/v1/query", {"question": "   "}, "question"),
        ("/v1/query", {"question": ""}, "question"),
        ("/v1/query", {"question": "x", "mode": "oracle"}, "mode"),
        ("/v1/query", {"question": "x", "filters": {"item_id": []}}, "filters"),
        ("/v1/read", {"question": "x", "documents": [{"text": " "}]}, "documents.0.text"),
        ("/v1/read", {"question": "x", "documents": []}, "documents"),
        ("/v1/generate", {"question": 7, "documents": [{"text": "x"}]}, "question"),
    ],
)
def test_invalid_bodies_name_the_field(
    http: httpx.Client, route: str, body: dict[str, Any], field: str
) -> None:
    error = assert_error(http.post(route, json=body), 422, "validation_error", field)
    assert error["message"].startswith(field)


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/v2/query"), 404, "not_found")
    assert_error(http.put("/v1/query", json={}), 405, "method_not_allowed")


def test_body_too_large_by_content_length(http: httpx.Client, writer: dict[str, str]) -> None:
    big = {"documents": [{"text": "word " * 20_000}]}  # ~100 KB > 64 KiB
    assert_error(http.post("/v1/documents", json=big, headers=writer), 413, "payload_too_large")


def test_body_too_large_when_chunked(http: httpx.Client, writer: dict[str, str]) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"documents": [{"text": "'
        for _ in range(100):
            yield b"word " * 200  # 1 KB each, no Content-Length: the server must count
        yield b'"}]}'

    headers = {**writer, "content-type": "application/json"}
    response = http.post("/v1/documents", content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


def test_bad_requests_leave_documents_intact(http: httpx.Client, writer: dict[str, str]) -> None:
    good = {"id": "keep", "text": "This one stays.", "meta": {"item_id": "x"}}
    http.post("/v1/documents", json={"collection": "intact", "documents": [good]}, headers=writer)
    other = {"id": "half", "text": "Valid on its own."}
    bad_batches = [
        {"collection": "intact", "documents": [other, {"id": "empty", "text": ""}]},
        {"collection": "intact", "documents": [other, {"id": "bad", "text": "x", "meta": []}]},
        {"collection": "intact", "documents": [other, {"text": "x" * 70_000}]},
    ]
    for body in bad_batches:
        assert http.post("/v1/documents", json=body, headers=writer).status_code in (413, 422)
    http.post("/v1/query", content=b"{", headers={"content-type": "application/json"})
    assert (
        http.get("/v1/documents/keep", params={"collection": "intact"}).json()["text"]
        == (good["text"])
    )
    # a rejected batch stores nothing, not even its valid documents
    assert http.get("/v1/documents/half", params={"collection": "intact"}).status_code == 404
    assert http.get("/healthz").status_code == 200


# --- input hygiene: what JSON and HTTP allow but the API cannot use ------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["ensemble", "generative"])
def test_more_documents_than_the_generator_reads_is_422(
    http: httpx.Client, mode: str, stream: bool
) -> None:
    """Finding 1: 21 documents for a generator that reads 20 was a 500 (a stream: 200, then
    an `error` event after `documents` and `answers`)."""
    body = {"question": "bass", "top_k_retriever": 21, "mode": mode, "stream": stream}
    error = assert_error(
        http.post("/v1/query", json=body), 422, "validation_error", "top_k_retriever"
    )
    assert "20" in error["message"]
    extractive = {**body, "mode": "extractive"}  # the reader takes 21
    assert http.post("/v1/query", json=extractive).status_code == 200


def test_generate_with_more_documents_than_it_reads_is_422(http: httpx.Client) -> None:
    documents = [{"text": f"Review {i}: the bass is deep."} for i in range(21)]
    body = {"question": "How is the bass?", "documents": documents}
    assert_error(http.post("/v1/generate", json=body), 422, "validation_error", "documents")


# Raw JSON text: "\ud800" (a lone surrogate) is valid JSON that decodes to a str no UTF-8
# encoder accepts. The field is named and nothing downstream sees the string.
LONE_SURROGATES = [
    ("/v1/documents", r'{"documents": [{"id": "s", "text": "a \ud800 b"}]}', "documents.0.text"),
    ("/v1/documents", r'{"documents": [{"id": "s\ud800", "text": "a b"}]}', "documents.0.id"),
    (
        "/v1/documents",
        r'{"documents": [{"text": "a", "meta": {"k\ud800": 1}}]}',
        "documents.0.meta",
    ),
    (
        "/v1/documents",
        r'{"documents": [{"text": "a", "meta": {"k": "\udfff"}}]}',
        "documents.0.meta.k",
    ),
    (
        "/v1/documents",
        r'{"documents": [{"text": "a", "meta": {"k": ["ok", "x\ud800"]}}]}',
        "documents.0.meta.k.1",
    ),
    ("/v1/documents", r'{"collection": "c\ud800", "documents": [{"text": "a"}]}', "collection"),
    ("/v1/query", r'{"question": "a \ud800 b"}', "question"),
    ("/v1/query", r'{"question": "ab", "filters": {"k\ud800": "v"}}', "filters"),
    ("/v1/query", r'{"question": "ab", "filters": {"k": "v\ud800"}}', "filters.k"),
    ("/v1/query", r'{"question": "ab", "filters": {"k": ["v", "\ud800"]}}', "filters.k.1"),
    ("/v1/query", r'{"question": "ab", "stream": true, "filters": {"k": "\ud800"}}', "filters.k"),
    ("/v1/query", r'{"question": "ab", "collection": "c\ud800"}', "collection"),
    ("/v1/retrieve", r'{"query": "a\ud800"}', "query"),
    ("/v1/retrieve", r'{"query": "ab", "collection": "c\ud800"}', "collection"),
    ("/v1/read", r'{"question": "ab", "documents": [{"text": "a\ud800"}]}', "documents.0.text"),
    (
        "/v1/read",
        r'{"question": "ab", "documents": [{"id": "\ud800", "text": "a"}]}',
        "documents.0.id",
    ),
    ("/v1/generate", r'{"question": "ab", "documents": [{"text": "a\ud800"}]}', "documents.0.text"),
]


@pytest.mark.parametrize(("route", "raw", "field"), LONE_SURROGATES)
def test_a_lone_surrogate_is_422_naming_the_field(
    http: httpx.Client, writer: dict[str, str], route: str, raw: str, field: str
) -> None:
    """Finding 2: in a document's text or a meta key it was a 500 (and the document text one
    broke the tokenizer); in a question, already a 422."""
    headers = {**writer, "content-type": "application/json"}
    response = http.post(route, content=raw.encode(), headers=headers)
    assert_error(response, 422, "validation_error", field)
    assert http.get("/v1/documents/s", headers=writer).status_code == 404  # nothing stored


@pytest.mark.parametrize(
    ("route", "raw", "field"),
    [
        (
            "/v1/generate",
            '{"question": "q", "documents": [{"text": "a", "score": NaN}]}',
            "documents.0.score",
        ),
        (
            "/v1/documents",
            '{"documents": [{"text": "a", "meta": {"k": Infinity}}]}',
            "documents.0.meta.k",
        ),
        ("/v1/query", '{"question": "q", "filters": {"k": -Infinity}}', "filters.k"),
    ],
)
def test_nan_and_infinity_are_422(
    http: httpx.Client, writer: dict[str, str], route: str, raw: str, field: str
) -> None:
    """Python's JSON decoder reads NaN and Infinity, which JSON has not: a stored Infinity was
    a 500, a NaN score made the generator's weights NaN."""
    headers = {**writer, "content-type": "application/json"}
    response = http.post(route, content=raw.encode(), headers=headers)
    assert_error(response, 422, "validation_error", field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"question": "q", "stream": 0}, "stream"),  # lax mode read 0 as false
        ({"question": "q", "top_k_retriever": "5"}, "top_k_retriever"),  # and "5" as 5
        ({"question": "q", "top_k_reader": True}, "top_k_reader"),  # and true as 1
    ],
)
def test_values_of_the_wrong_json_type_are_422(
    http: httpx.Client, body: dict[str, Any], field: str
) -> None:
    assert_error(http.post("/v1/query", json=body), 422, "validation_error", field)
    assert http.post("/v1/query", json={"question": "q", "top_k_retriever": 5.0}).is_success


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/json; charset=latin-1",
    ],
)
def test_a_body_that_is_not_json_is_415(http: httpx.Client, content_type: str) -> None:
    """Finding 10: FastAPI read such a body as bytes and answered 422."""
    body = json.dumps({"query": "battery"}).encode()
    response = http.post("/v1/retrieve", content=body, headers={"content-type": content_type})
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/merge-patch+json",
    ],
)
def test_json_media_types_are_accepted(http: httpx.Client, content_type: str) -> None:
    body = json.dumps({"query": "battery"}).encode()
    response = http.post("/v1/retrieve", content=body, headers={"content-type": content_type})
    assert response.status_code == 200, response.text


def test_a_write_without_a_key_is_401_before_its_media_type(api_server: Any) -> None:
    response = httpx.post(
        f"{api_server.url}/v1/documents", content=b"x", headers={"content-type": "text/plain"}
    )
    assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/documents/x", {"GET", "DELETE"}),
        ("POST", "/v1/documents/x", {"GET", "DELETE"}),
        ("PUT", "/v1/query", {"POST"}),
        ("GET", "/v1/documents", {"POST"}),
        ("PUT", "/openai/v1/models", {"GET"}),
        ("DELETE", "/openai/v1/chat/completions", {"POST"}),
    ],
)
def test_405_allows_every_method_of_the_path(
    http: httpx.Client, method: str, path: str, allowed: set[str]
) -> None:
    """Finding 10: Starlette's Allow named the first route's methods only (GET, not the DELETE
    of /v1/documents/{id}); the OpenAI routes sent none."""
    response = http.request(method, path)
    assert response.status_code == 405, response.text
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed


@pytest.mark.parametrize("chunked", [False, True])
def test_urllib_reads_the_413_of_a_body_far_over_the_limit(api_server: Any, chunked: bool) -> None:
    """Finding 9: the server answered 413 and closed while the body was still arriving, and
    urllib (which sends the whole body before reading) saw "connection reset by peer". 8 MB
    against the 64 KiB limit, five times: without the drain every try is reset."""
    import urllib.error
    import urllib.request

    body = b'{"documents": [{"text": "' + b"word " * (8 * 2**20 // 5) + b'"}]}'
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {api_server.write_key}",
    }
    for _ in range(5):
        # an iterable body has no length: urllib sends it chunked
        data: Any = (
            iter([body[i : i + 2**16] for i in range(0, len(body), 2**16)]) if chunked else body
        )
        request = urllib.request.Request(
            f"{api_server.url}/v1/documents", data=data, headers=headers, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413
        assert json.loads(refused.value.read())["error"]["type"] == "payload_too_large"


# --- keys --------------------------------------------------------------------------------------


def test_writes_need_a_write_key(
    http: httpx.Client, api_server: Any, writer: dict[str, str]
) -> None:
    body = {"collection": "keys", "documents": [{"id": "k", "text": "Keyed."}]}
    missing = httpx.post(f"{api_server.url}/v1/documents", json=body)
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(
        http.post("/v1/documents", json=body, headers={"X-API-Key": "not-a-key-at-all"}),
        401,
        "unauthorized",
    )
    read_only = {"Authorization": f"Bearer {api_server.read_key}"}
    assert_error(http.post("/v1/documents", json=body, headers=read_only), 403, "forbidden")
    assert_error(http.delete("/v1/documents/k", headers=read_only), 403, "forbidden")
    ok = http.post("/v1/documents", json=body, headers={"X-API-Key": api_server.write_key})
    assert ok.status_code == 200
    # reads need a key too, a read key or a write key
    anonymous = httpx.get(f"{api_server.url}/v1/documents/k", params={"collection": "keys"})
    assert_error(anonymous, 401, "unauthorized")
    assert http.get("/v1/documents/k", params={"collection": "keys"}, headers=read_only).is_success
    assert http.get("/v1/documents/k", params={"collection": "keys"}, headers=writer).is_success


def test_reads_need_a_key(api_server: Any, serve_app: Any) -> None:
    cfg = ServerConfig(api_keys=[ApiKey(key=api_server.read_key)])
    url = serve_app(build_app(api_server.backend, cfg))
    with httpx.Client(base_url=url) as client:
        body = {"query": "battery"}
        assert_error(client.post("/v1/retrieve", json=body), 401, "unauthorized")
        assert_error(client.get("/v1/models"), 401, "unauthorized")
        headers = {"X-API-Key": api_server.read_key}
        assert client.post("/v1/retrieve", json=body, headers=headers).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes stay open
        assert client.get("/readyz").status_code == 200


# --- a failing graph ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty(api_server: Any, serve_app: Any) -> tuple[FaultyBackend, str]:
    backend = FaultyBackend(api_server.backend)
    cfg = ServerConfig(api_keys=[], timeouts_s={"retrieve": 0.5}, retry_after_s=3)
    return backend, serve_app(build_app(cast(Any, backend), cfg))  # a duck-typed Pipeline


def test_overloaded_is_503_with_retry_after(faulty: tuple[FaultyBackend, str]) -> None:
    backend, url = faulty
    backend.inject("retrieve", Overloaded("the retriever's queue is full"))
    response = httpx.post(f"{url}/v1/retrieve", json={"query": "battery"})
    assert_error(response, 503, "overloaded")
    assert response.headers["retry-after"] == "3"
    assert httpx.post(f"{url}/v1/retrieve", json={"query": "battery"}).status_code == 200


def test_slow_stage_is_504(faulty: tuple[FaultyBackend, str]) -> None:
    backend, url = faulty
    backend.inject("retrieve", 2.0)
    response = httpx.post(f"{url}/v1/retrieve", json={"query": "battery"})
    error = assert_error(response, 504, "timeout")
    assert "retrieve" in error["message"]


def test_unexpected_error_is_a_generic_500(faulty: tuple[FaultyBackend, str]) -> None:
    backend, url = faulty
    backend.inject("models", RuntimeError("secret path /etc/shadow in a traceback"))
    response = httpx.get(f"{url}/v1/models")
    error = assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text
    assert error["message"] == "internal server error"


def test_error_before_the_stream_starts_keeps_its_status(
    faulty: tuple[FaultyBackend, str],
) -> None:
    backend, url = faulty
    backend.inject("query_events", DocumentNotFound("no such collection", "collection"))
    response = httpx.post(f"{url}/v1/query", json={"question": QUESTION, "stream": True})
    assert_error(response, 404, "not_found", "collection")


def test_error_mid_stream_is_an_error_event(faulty: tuple[FaultyBackend, str]) -> None:
    backend, url = faulty
    backend.inject("query_events.next", None, RuntimeError("reader exploded"))
    body = {"question": QUESTION, "collection": "api", "stream": True}
    received = events(httpx.post(f"{url}/v1/query", json=body, timeout=60))
    assert [name for name, _ in received] == ["documents", "answers", "error"]
    assert received[-1][1] == {
        "error": {"type": "internal_error", "message": "internal server error"}
    }


def test_too_many_requests_in_flight_is_503(api_server: Any, serve_app: Any) -> None:
    backend = FaultyBackend(api_server.backend)
    cfg = ServerConfig(api_keys=[], max_ongoing_requests=1)
    url = serve_app(build_app(cast(Any, backend), cfg))  # a duck-typed Pipeline
    release = threading.Event()
    backend.inject("retrieve", release)
    first: dict[str, httpx.Response] = {}
    slow = threading.Thread(
        target=lambda: first.update(r=httpx.post(f"{url}/v1/retrieve", json={"query": "x"}))
    )
    slow.start()
    try:
        for _ in range(200):  # until the first request holds the only slot
            if backend.calls["retrieve"]:
                break
            threading.Event().wait(0.01)
        response = httpx.post(f"{url}/v1/retrieve", json={"query": "x"})
        assert_error(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes are not admitted
    finally:
        release.set()
        slow.join(30)
    assert first["r"].status_code == 200
    assert httpx.post(f"{url}/v1/retrieve", json={"query": "x"}).status_code == 200


# --- streams stop when nobody listens ------------------------------------------------------------


def test_a_disconnected_client_stops_the_stream(api_server: Any, serve_app: Any) -> None:
    closed = threading.Event()

    class Endless(FaultyBackend):
        async def query_events(self, request: Any) -> AsyncIterator[Any]:
            try:
                while True:
                    yield "token", GeneratedToken(id=1, text="x", logprob=0.0)
                    await asyncio.sleep(0.01)
            finally:
                closed.set()

    backend = cast(Any, Endless(api_server.backend))  # a duck-typed Pipeline
    url = serve_app(build_app(backend, ServerConfig(api_keys=[])))
    body = {"question": QUESTION, "stream": True}
    with httpx.stream("POST", f"{url}/v1/query", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines) == "event: token"
    assert closed.wait(10)


def test_local_backend_closes_an_abandoned_iterator(api_server: Any) -> None:
    closed = threading.Event()

    def numbers() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.set()

    async def take_two() -> list[int]:
        stream = iterate_blocking(numbers, api_server.backend.calls._pool)
        taken = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return taken

    assert asyncio.run(take_two()) == [0, 1]
    assert closed.wait(5)  # closed in the pool, where it ran


def test_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QASERVE_API_KEYS", "writer-key-1:rw, reader-key-2 ,reader-key-3:r")
    keys = ServerConfig().api_keys
    assert [(k.key, k.write) for k in keys] == [
        ("writer-key-1", True),
        ("reader-key-2", False),
        ("reader-key-3", False),
    ]
    monkeypatch.setenv("QASERVE_API_KEYS", "writer-key-1:admin")
    with pytest.raises(ValueError, match="rights"):
        ServerConfig()
