"""Writes: all or nothing at a timeout, asynchronous ingest (202 + operations), concurrent
writers embedding side by side; the kill -9 drill and a short soak (slow).

The app runs over the tiny engine in-process (tests/conftest.py); the embedder is the real
packaged MiniLM, so a write of a few dozen reviews takes seconds of CPU to embed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import READ_KEY, WRITE_KEY, ApiServer

from qaserve_client.schema import IngestResponse, Operation

REVIEW = (
    "I bought these headphones for the commute. The sound is warm, the bass is deep without "
    "drowning the vocals, and the noise cancelling takes the edge off the train. The battery "
    "lasted a week of daily use before the first charge. The ear cushions get warm after an "
    "hour and the case is bulky, but the folding hinge feels solid and the cable is long. "
)


COLLECTION = "writes"  # the session's store is shared: these reviews stay out of others' way
IN = {"collection": COLLECTION}


def reviews(prefix: str, n: int, repeat: int = 1) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "text": f"Review {i}. " + REVIEW * repeat} for i in range(n)]


def auth(key: str = WRITE_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def stages(server: ApiServer) -> Any:
    return server.backend.calls  # LocalStages


def wait_writes_finished(server: ApiServer, timeout_s: float = 120) -> None:
    """Until every write the store owner has accepted has finished (committed or stopped)."""
    ops = stages(server).operations
    deadline = time.monotonic() + timeout_s
    while any(not op.finished for op in list(ops._ops.values())):
        assert time.monotonic() < deadline, "a write never finished"
        time.sleep(0.1)


@contextlib.contextmanager
def embedding_held(embedder: Any) -> Iterator[threading.Event]:
    """The first embedding batch waits until the test lets it go: the write is certainly
    still embedding when its caller gives up, however fast the encoder."""
    release = threading.Event()
    real = embedder.embed
    calls = iter(range(1))

    def embed(texts: list[str]) -> Any:
        if next(calls, None) is not None:
            release.wait(60)
        return real(texts)

    embedder.embed = embed
    try:
        yield release
    finally:
        release.set()
        del embedder.embed  # the class's method again


@pytest.fixture
def held(api_server: ApiServer) -> Iterator[threading.Event]:
    with embedding_held(stages(api_server).retriever.embedder) as release:
        yield release


@pytest.fixture(scope="module")
def short_timeout_url(local_backend: Any, serve_app: Callable[[Any], str]) -> str:
    """The same backend behind an app whose writes time out at 0.3 s."""
    from qaserve.config import ApiKey, ServerConfig
    from qaserve.runtime.api import build_app

    cfg = ServerConfig(
        api_keys=[ApiKey(key=WRITE_KEY, write=True), ApiKey(key=READ_KEY)],
        timeouts_s={"ingest": 0.3},
    )
    return serve_app(build_app(local_backend, cfg))


# --- all or nothing -----------------------------------------------------------------------


def test_timed_out_write_leaves_nothing_behind(
    api_server: ApiServer, short_timeout_url: str, held: threading.Event
) -> None:
    """Finding 5: a 2 MB document got 504 and was stored minutes later. Now a 504 stops the
    write before its commit: once every write has finished, none of its ids exist."""
    docs = reviews("timeout", 24, repeat=3)  # ~70 passages: seconds to embed
    r = httpx.post(
        f"{short_timeout_url}/v1/documents",
        json={"documents": docs, "collection": COLLECTION},
        headers=auth(),
        timeout=60,
    )
    assert r.status_code == 504, r.text
    assert "nothing was written" in r.json()["error"]["message"]
    held.set()
    wait_writes_finished(api_server)
    for d in docs:
        got = httpx.get(
            f"{api_server.url}/v1/documents/{d['id']}", params=IN, headers=auth(), timeout=30
        )
        assert got.status_code == 404, f"{d['id']} was written after its 504"


def test_disconnected_writer_leaves_nothing_behind(
    api_server: ApiServer, held: threading.Event
) -> None:
    """A client that goes away mid-write (over HTTP): the write stops before its commit."""
    docs = reviews("gone-http", 24, repeat=3)
    before = set(stages(api_server).operations._ops)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{api_server.url}/v1/documents",
            json={"documents": docs, "collection": COLLECTION},
            headers=auth(),
            timeout=1.0,
        )
    deadline = time.monotonic() + 30
    while not any(op._cancel for op in stages(api_server).operations._ops.values()):
        assert time.monotonic() < deadline, "the disconnect never cancelled the write"
        time.sleep(0.05)
    held.set()
    wait_writes_finished(api_server)
    ops = stages(api_server).operations._ops
    assert [op.status for k, op in ops.items() if k not in before] == ["cancelled"]
    for d in docs:
        got = httpx.get(
            f"{api_server.url}/v1/documents/{d['id']}", params=IN, headers=auth(), timeout=30
        )
        assert got.status_code == 404, f"{d['id']} was written after its writer left"


def test_abandoned_write_leaves_nothing_behind(tiny_engine_config: Any) -> None:
    """A caller that goes away (the route's task cancelled, as on a client disconnect)
    mid-embedding: the write stops before its commit, nothing is written."""
    from qaserve.runtime.local import local_pipeline
    from qaserve_client.schema import DocumentIn, IngestRequest

    pipeline = local_pipeline(tiny_engine_config, workers=2, preload=False)
    calls: Any = pipeline.calls  # LocalStages
    docs = [DocumentIn(**d) for d in reviews("gone", 24, repeat=3)]
    request = IngestRequest(documents=docs, collection="abandoned")

    async def scenario(release: threading.Event) -> list[str]:
        ops = calls.operations
        task = asyncio.ensure_future(pipeline.ingest(request, timeout=600))
        while not any(op.total for op in ops._ops.values()):  # split: embedding has begun
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 30
        while not any(op._cancel for op in ops._ops.values()):  # the detached cancel landed
            if time.monotonic() > deadline:
                break  # it never came: the write goes on, and the status below says so
            await asyncio.sleep(0.01)
        release.set()
        while any(not op.finished for op in ops._ops.values()):
            await asyncio.sleep(0.05)
        return [op.status for op in ops._ops.values()]

    try:
        with embedding_held(calls.retriever.embedder) as release:
            assert asyncio.run(scenario(release)) == ["cancelled"]
        assert calls.retriever.count("abandoned") == 0
    finally:
        pipeline.close()


def test_a_cancel_during_the_commit_lets_it_complete() -> None:
    """The gate: a cancel after the commit began is refused and the write completes (the
    caller gets its answer); one before it stops the write and nothing is committed."""
    from qaserve.deployments.operations import Operations, WriteOp
    from qaserve.errors import StageTimeout

    async def scenario() -> tuple[str, str, list[str]]:
        ops = Operations()
        committed: list[str] = []
        in_commit, release = asyncio.Event(), asyncio.Event()

        async def commits(op: WriteOp) -> IngestResponse:
            op.begin_commit()
            in_commit.set()
            await release.wait()
            committed.append(op.id)
            return IngestResponse(ids=["a"], passages=1)

        async def embeds_forever(op: WriteOp) -> IngestResponse:
            while True:
                op.check()
                await asyncio.sleep(0.01)

        late = ops.start(commits)
        await in_commit.wait()
        cancel = asyncio.ensure_future(ops.cancel(late.id, StageTimeout("late")))
        await asyncio.sleep(0.05)
        release.set()
        finished = await cancel
        early = ops.start(embeds_forever)
        stopped = await ops.cancel(early.id, StageTimeout("nothing was written"))
        return finished.status, stopped.status, committed

    late, early, committed = asyncio.run(scenario())
    assert late == "done" and len(committed) == 1
    assert early == "cancelled"


def test_a_commit_cut_short_leaves_each_document_whole(
    api_server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replace-by-id across passages: a commit that fails (or is killed) part-way leaves each
    document all old or all new, never new passage 0 with an old passage 1."""
    from qaserve.deployments import store as store_module
    from qaserve.deployments.store import point_id
    from qaserve_client.schema import DocumentIn

    retriever = stages(api_server).retriever
    ids = [f"whole-{i}" for i in range(3)]
    old = [DocumentIn(id=i, text=f"Old {i}. " + REVIEW * 3) for i in ids]
    new = [DocumentIn(id=i, text=(f"New {i}. " + REVIEW * 3).upper()) for i in ids]
    retriever.ingest(old, collection="atomic")
    store = retriever._store("atomic")
    real = store._upsert_points
    calls: list[int] = []

    def cut(points: list[Any]) -> None:
        calls.append(len(points))
        if len(calls) == 2:
            raise RuntimeError("the store went away")
        real(points)

    monkeypatch.setattr(store_module, "WRITE_BATCH", 3)  # 2 passages per document
    monkeypatch.setattr(store, "_upsert_points", cut)
    with pytest.raises(RuntimeError, match="went away"):
        retriever.ingest(new, collection="atomic")
    monkeypatch.undo()
    versions = {}
    for doc_id in ids:
        records = store._retrieve([point_id(doc_id, n) for n in range(2)], True)
        assert len(records) == 2
        versions[doc_id] = {r.payload["text"].isupper() for r in records}
    assert all(len(v) == 1 for v in versions.values()), versions  # none mixed
    assert versions[ids[0]] == {True} and versions[ids[2]] == {False}


# --- asynchronous ingest ----------------------------------------------------------------------


def test_async_ingest_202_poll_to_done(api_server: ApiServer) -> None:
    docs = reviews("async", 40, repeat=3)  # 80 passages: three embedding batches
    r = httpx.post(
        f"{api_server.url}/v1/documents",
        params={"wait": "false"},
        json={"documents": docs, "collection": COLLECTION},
        headers=auth(),
        timeout=30,
    )
    assert r.status_code == 202, r.text
    op = Operation.model_validate_json(r.content)
    assert r.headers["location"] == f"/v1/operations/{op.id}"
    assert op.status in ("queued", "running")
    seen: list[Operation] = []
    deadline = time.monotonic() + 120
    while not op.finished:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        got = httpx.get(api_server.url + r.headers["location"], headers=auth(), timeout=30)
        assert got.status_code == 200, got.text
        op = Operation.model_validate_json(got.content)
        seen.append(op)
    assert op.status == "done", op
    assert op.result is not None and op.result.ids == [d["id"] for d in docs]
    assert op.progress.passages == op.result.passages == op.progress.embedded > len(docs)
    embedded = [o.progress.embedded for o in seen]
    assert embedded == sorted(embedded)
    assert any(0 < o.progress.embedded < o.progress.passages for o in seen)  # batch by batch
    assert op.finished_at is not None and op.finished_at >= op.created_at
    for d in docs:
        got = httpx.get(
            f"{api_server.url}/v1/documents/{d['id']}", params=IN, headers=auth(), timeout=30
        )
        assert got.status_code == 200


def test_operations_need_the_write_key_and_unknown_is_404(api_server: ApiServer) -> None:
    url = f"{api_server.url}/v1/operations/nope"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers=auth(READ_KEY), timeout=30).status_code == 403
    r = httpx.get(url, headers=auth(), timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = httpx.post(
        f"{api_server.url}/v1/documents",
        params={"wait": "false"},
        json={"documents": reviews("ro", 1), "collection": COLLECTION},
        headers=auth(READ_KEY),
        timeout=30,
    )
    assert r.status_code == 403


def test_failed_async_write_reports_its_error(api_server: ApiServer) -> None:
    """A write that fails after its 202 says why, as the synchronous write would have."""
    from qaserve_client.client import Client
    from qaserve_client.errors import QAServeHTTPError

    stage = stages(api_server)
    real = stage.retriever.write

    def broken(*args: Any) -> Any:
        raise ValueError("the store refused the batch")

    stage.retriever.write = broken
    try:
        with Client(api_server.url, api_key=WRITE_KEY) as client:
            op = client.ingest(reviews("fails", 2), COLLECTION, wait=False)
            assert isinstance(op, Operation)
            with pytest.raises(QAServeHTTPError) as err:
                client.wait_operation(op, timeout=60, interval=0.05)
            assert err.value.status == 400 and "refused" in err.value.message
            assert client.operation(op.id).status == "failed"
    finally:
        stage.retriever.write = real


def test_sdk_ingest_without_waiting(api_server: ApiServer) -> None:
    from qaserve_client.client import AsyncClient, Client

    with Client(api_server.url, api_key=WRITE_KEY) as client:
        op = client.ingest(reviews("sdk", 3), COLLECTION, wait=False)
        assert isinstance(op, Operation)
        done = client.wait_operation(op, timeout=120, interval=0.05)
        assert done.result is not None and done.result.ids == ["sdk-0", "sdk-1", "sdk-2"]
        assert client.get_document("sdk-2", COLLECTION).text.startswith("Review 2.")

    async def run() -> Operation:
        async with AsyncClient(api_server.url, api_key=WRITE_KEY) as client:
            started = await client.ingest(reviews("asdk", 2), COLLECTION, wait=False)
            assert isinstance(started, Operation)
            return await client.wait_operation(started.id, timeout=120, interval=0.05)

    assert asyncio.run(run()).status == "done"


# --- concurrent writers -------------------------------------------------------------------


@pytest.fixture
def embed_rendezvous(api_server: ApiServer) -> Iterator[threading.Barrier]:
    """The first embedding batch of each of two writes waits for the other's to start: if
    embedding were serialised behind the write lock, the second never would (broken)."""
    embedder = stages(api_server).retriever.embedder
    real = embedder.embed
    barrier = threading.Barrier(2, timeout=30)
    calls = iter(range(2))

    def embed(texts: list[str]) -> Any:
        if next(calls, None) is not None:
            barrier.wait()
        return real(texts)

    embedder.embed = embed
    yield barrier
    del embedder.embed  # the class's method again


def test_concurrent_writes_embed_side_by_side(
    api_server: ApiServer, embed_rendezvous: threading.Barrier
) -> None:
    """Finding 7: writes ran one at a time. Two writes' embedding now overlaps (both are
    inside `embed` at once); only the commits take turns."""

    def write(prefix: str) -> int:
        r = httpx.post(
            f"{api_server.url}/v1/documents",
            json={"documents": reviews(prefix, 2), "collection": COLLECTION},
            headers=auth(),
            timeout=120,
        )
        return r.status_code

    results: dict[str, int] = {}
    threads = [
        threading.Thread(target=lambda p=p: results.__setitem__(p, write(p))) for p in ("x", "y")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not embed_rendezvous.broken
    assert results == {"x": 200, "y": 200}


# --- drills (slow: a Ray graph through `qaserve serve`) -------------------------------------


@pytest.mark.slow
def test_kill9_drill_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    """kill -9 of the server's process group under 2 writers, restart: every acknowledged
    document is back, each id stored exactly once."""
    from qaserve.offline.drills import drill_kill9, review_texts

    result = drill_kill9(review_texts(), tmp_path, n=2, size=5, write_s=8.0)
    print(result)  # the figures, with -s
    assert result["acked"] > 0, result
    assert result["acked_present"] == result["acked"], result
    assert result["ids_exactly_once"] == result["ids_checked"], result
    assert result["ok"], result


@pytest.mark.slow
def test_short_soak_holds_memory(api_server: ApiServer) -> None:
    """Queries and writes mixed for 40 s against the in-process app; this process's RSS
    (models, store, pool) does not grow beyond the bound."""
    import os

    from qaserve.offline.drills import drill_soak, review_texts

    result = drill_soak(
        api_server.url,
        review_texts(),
        os.getpid(),
        duration_s=40,
        readers=2,
        writers=1,
        size=3,
        every_s=2,
        warmup_s=10,
        bound_mb=150,
        key=WRITE_KEY,
        collection="soak",
    )
    print(result)  # the figures, with -s
    assert result["ok"], result
