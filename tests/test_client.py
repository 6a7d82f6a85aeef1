"""The Python SDK against the served tiny engine: typed answers, errors, streams, retries."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from typing import Any, cast

import httpx
import pytest
from tiny_models import FaultyBackend

from qaserve.config import ServerConfig
from qaserve.errors import Overloaded as ServerOverloaded
from qaserve.runtime.api import build_app
from qaserve_client import errors, sse
from qaserve_client.client import AsyncClient, Client, Retry
from qaserve_client.schema import (
    DocumentIn,
    GeneratedToken,
    QueryResponse,
    ReadResponse,
    RetrieveResponse,
)

QUESTION = "How long does the battery last?"
DOCS = [
    DocumentIn(id="sdk-battery", text="The battery lasts ten hours.", meta={"item_id": "phone"}),
    DocumentIn(id="sdk-case", text="The case feels solid and cheap.", meta={"item_id": "phone"}),
    DocumentIn(id="sdk-pool", text="The pool was cold but clean.", meta={"item_id": "hotel"}),
]
FAST = Retry(attempts=3, backoff=0.01, max_delay=5.0)
served = pytest.mark.slow  # the retriever behind the server is the real packaged MiniLM


def test_sdk_imports_without_server_dependencies() -> None:
    code = (
        "import sys, qaserve_client.client, qaserve_client.errors\n"
        "print(sorted(m for m in ('torch', 'ray', 'fastapi', 'qaserve') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def client(api_server: Any) -> Any:
    with Client(api_server.url, api_key=api_server.write_key, retry=FAST) as c:
        c.ingest(DOCS, collection="sdk")
        yield c


@served
def test_documents_round_trip(client: Client) -> None:
    doc = client.get_document("sdk-battery", collection="sdk")
    assert (doc.id, doc.text, doc.meta) == ("sdk-battery", DOCS[0].text, {"item_id": "phone"})
    added = client.ingest(["A plain string becomes a document."], collection="sdk_tmp")
    (new_id,) = added.ids
    assert client.get_document(new_id, collection="sdk_tmp").text.startswith("A plain string")
    assert client.delete_document(new_id, collection="sdk_tmp") is None
    with pytest.raises(errors.NotFound) as caught:
        client.get_document(new_id, collection="sdk_tmp")
    assert (caught.value.status, caught.value.type, caught.value.field) == (404, "not_found", "id")


@served
def test_stages_compose(client: Client) -> None:
    hits = client.retrieve(QUESTION, top_k=3, filters={"item_id": "phone"}, collection="sdk")
    assert isinstance(hits, RetrieveResponse)
    assert {d.id for d in hits.documents} == {"sdk-battery", "sdk-case"}
    read = client.read(QUESTION, hits.documents, top_k=1)  # retrieved hits go straight in
    assert isinstance(read, ReadResponse) and len(read.answers) == 1
    assert read.answers[0].document_id in {"sdk-battery", "sdk-case"}
    generated = client.generate(QUESTION, hits.documents, max_new_tokens=3)
    assert generated.tokens and len(generated.document_weights) == 2
    streamed = list(client.generate_stream(QUESTION, hits.documents, max_new_tokens=3))
    assert all(isinstance(t, GeneratedToken) for t in streamed)
    assert streamed == generated.tokens


@served
def test_query_and_its_stream(client: Client) -> None:
    kwargs: dict[str, Any] = {
        "collection": "sdk",
        "max_new_tokens": 4,
        "filters": {"item_id": "phone"},
    }
    answer = client.query(QUESTION, **kwargs)
    assert isinstance(answer, QueryResponse)
    events = list(client.query_stream(QUESTION, **kwargs))
    names = [name for name, _ in events]
    assert names[:2] == ["documents", "answers"] and names[-1] == "answer"
    assert set(names[2:-1]) == {"token"}
    final = events[-1][1]
    assert isinstance(final, QueryResponse)
    assert final.answer == answer.answer and final.documents == answer.documents
    assert final.generated is not None
    assert [p for n, p in events if n == "token"] == final.generated.tokens


@served
def test_models_health_ready(client: Client) -> None:
    assert {m.stage for m in client.models()} >= {"retriever", "reader", "generator"}
    assert client.health().status == "ok"
    ready = client.ready()
    assert ready.ready and all(ready.stages.values())


@served
def test_http_errors_are_typed(api_server: Any, client: Client) -> None:
    with pytest.raises(errors.ValidationError) as caught:
        client.query("   ")
    assert (caught.value.status, caught.value.field) == (422, "question")
    with pytest.raises(errors.ValidationError) as caught:
        client.retrieve("x", top_k=0)
    assert caught.value.field == "top_k"
    with Client(api_server.url, api_key="") as anonymous, pytest.raises(errors.Unauthorized):
        anonymous.ingest(DOCS[:1], collection="sdk")
    with Client(api_server.url, api_key=api_server.read_key) as reader:
        with pytest.raises(errors.Forbidden) as forbidden:
            reader.delete_document("sdk-battery", collection="sdk")
        assert forbidden.value.type == "forbidden" and forbidden.value.message
        assert reader.get_document("sdk-battery", collection="sdk").id == "sdk-battery"


@served
def test_async_client_has_the_same_methods(api_server: Any) -> None:
    async def run() -> None:
        async with AsyncClient(api_server.url, api_key=api_server.write_key, retry=FAST) as c:
            added = await c.ingest(DOCS, collection="sdk_async")
            assert added.ids == [d.id for d in DOCS]
            assert (await c.get_document("sdk-pool", collection="sdk_async")).text == DOCS[2].text
            hits = await c.retrieve(
                "cold pool", filters={"item_id": "hotel"}, collection="sdk_async"
            )
            assert [d.id for d in hits.documents] == ["sdk-pool"]
            assert (await c.read(QUESTION, hits.documents)).answers
            generated = await c.generate(QUESTION, hits.documents, max_new_tokens=3)
            tokens = [
                t async for t in c.generate_stream(QUESTION, hits.documents, max_new_tokens=3)
            ]
            assert tokens == generated.tokens
            answer = await c.query(QUESTION, collection="sdk_async", mode="extractive")
            events = [
                e async for e in c.query_stream(QUESTION, collection="sdk_async", mode="extractive")
            ]
            assert [n for n, _ in events] == ["documents", "answers", "answer"]
            assert cast(QueryResponse, events[-1][1]).answer == answer.answer
            assert (await c.ready()).ready and (await c.health()).status == "ok"
            assert await c.models()
            await c.delete_document("sdk-pool", collection="sdk_async")
            with pytest.raises(errors.NotFound):
                await c.delete_document("sdk-pool", collection="sdk_async")

    asyncio.run(run())


# --- retries -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flaky(api_server: Any, serve_app: Any) -> tuple[FaultyBackend, str]:
    backend = FaultyBackend(api_server.backend)
    cfg = ServerConfig(api_keys=[], retry_after_s=1)
    return backend, serve_app(build_app(cast(Any, backend), cfg))  # a duck-typed Pipeline


def busy() -> ServerOverloaded:
    return ServerOverloaded("queue full")


@served
def test_retries_honour_retry_after(flaky: tuple[FaultyBackend, str]) -> None:
    backend, url = flaky
    backend.inject("retrieve", busy())
    before = backend.calls["retrieve"]
    with Client(url, retry=FAST) as c:
        start = time.monotonic()
        hits = c.retrieve("battery", collection="sdk")
        elapsed = time.monotonic() - start
    assert hits.documents
    assert backend.calls["retrieve"] - before == 2
    assert elapsed >= 0.95  # Retry-After: 1 second, not the 10 ms backoff


@served
def test_async_retries_honour_retry_after(flaky: tuple[FaultyBackend, str]) -> None:
    backend, url = flaky
    backend.inject("retrieve", busy())

    async def run() -> float:
        async with AsyncClient(url, retry=FAST) as c:
            start = time.monotonic()
            await c.retrieve("battery", collection="sdk")
            return time.monotonic() - start

    assert asyncio.run(run()) >= 0.95


@served
def test_retries_give_up_after_the_last_attempt(flaky: tuple[FaultyBackend, str]) -> None:
    backend, url = flaky
    backend.inject("retrieve", *[busy()] * 3)
    before = backend.calls["retrieve"]
    patient = Retry(attempts=2, backoff=0.01, max_delay=0.5)
    # Retry-After (1 s) beyond max_delay: raised at once, with the server's hint
    with Client(url, retry=patient) as c, pytest.raises(errors.Overloaded) as caught:
        c.retrieve("battery")
    assert caught.value.retry_after == 1.0 and caught.value.status == 503
    assert backend.calls["retrieve"] - before == 1
    backend.faults["retrieve"].clear()


@served
def test_ingest_is_retried_only_when_every_document_has_an_id(
    flaky: tuple[FaultyBackend, str],
) -> None:
    backend, url = flaky
    with Client(url, retry=FAST) as c:
        backend.inject("ingest", busy())
        with pytest.raises(errors.Overloaded):
            c.ingest([{"text": "No id: a retry could store it twice."}], collection="sdk_retry")
        assert backend.calls["ingest"] == 1
        backend.inject("ingest", busy())
        assert c.ingest(DOCS[:1], collection="sdk_retry").ids == ["sdk-battery"]
        assert backend.calls["ingest"] == 3


@served
def test_stream_is_retried_before_its_first_event(flaky: tuple[FaultyBackend, str]) -> None:
    backend, url = flaky
    backend.inject("query_events", busy())
    with Client(url, retry=FAST) as c:
        events = list(c.query_stream(QUESTION, collection="sdk", mode="extractive"))
    assert [n for n, _ in events] == ["documents", "answers", "answer"]


@served
def test_error_event_raises(flaky: tuple[FaultyBackend, str]) -> None:
    backend, url = flaky
    backend.inject("query_events.next", busy())
    seen = []
    with Client(url, retry=FAST) as c, pytest.raises(errors.Overloaded):
        for name, _ in c.query_stream(QUESTION, collection="sdk", mode="extractive"):
            seen.append(name)
    assert seen == ["documents"]  # the error came after it; a started stream is not retried


@served
def test_client_timeout(flaky: tuple[FaultyBackend, str]) -> None:
    backend, url = flaky
    backend.inject("retrieve", 1.5)
    before = backend.calls["retrieve"]
    with Client(url, timeout=0.3, retry=FAST) as c, pytest.raises(errors.QAServeTimeout):
        c.retrieve("battery")
    assert backend.calls["retrieve"] - before == 1  # a read timeout is not retried


def test_connection_errors_are_retried_then_raised() -> None:
    class Counting(httpx.HTTPTransport):
        sent = 0

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            self.sent += 1
            return super().handle_request(request)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    transport = Counting()
    url = f"http://127.0.0.1:{port}"
    with (
        Client(url, retry=FAST, transport=transport) as c,
        pytest.raises(errors.QAServeConnectionError),
    ):
        c.health()
    assert transport.sent == 1 + FAST.attempts


def test_sse_framing_survives_any_chunking_and_unicode_line_breaks() -> None:
    token = GeneratedToken(id=3, text="a\u2028b\x85c\r\nd", logprob=-0.5)
    wire = (sse.encode("token", token.model_dump_json()) + sse.encode("done", "{}")).decode()
    for size in (1, 2, 5, len(wire)):
        for text in (wire, wire.replace("\n", "\r\n")):
            decoder = sse.SSEDecoder()
            received = [
                e for i in range(0, len(text), size) for e in decoder.feed(text[i : i + size])
            ]
            assert [e.event for e in received] == ["token", "done"]
            assert GeneratedToken.model_validate_json(received[0].data) == token
