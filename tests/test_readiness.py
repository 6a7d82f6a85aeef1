"""/readyz on the Ray graph says ready only once the first-start sample ingest has landed.

The graph is deployed with `sample_corpus` on an empty store that this test holds open (an
Edge shard's WAL takes one process at a time): the Retriever's seeding cannot finish, a
deterministic "ingest still running" window. /readyz must be 503 with the retriever not ready
through it; once the test lets go, /readyz turns 200 and by then every sample document is in.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ray = pytest.importorskip("ray")


def _readyz(url: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{url}/readyz", timeout=30)
    except httpx.HTTPError:
        return None  # the proxy not listening yet


def test_readyz_is_503_until_the_sample_corpus_is_in(
    tiny_engine_config: Any, tmp_path: Path
) -> None:
    from ray import serve

    from qaserve.deployments.store import make_store
    from qaserve.loaders import sample_documents
    from qaserve.runtime.graph import build_graph
    from qaserve.runtime.graph_config import APP_NAME, GraphConfig, StageOptions
    from qaserve.runtime.server import free_port
    from qaserve.stages import DEPLOYMENTS

    engine = tiny_engine_config.model_copy(update={"data_dir": tmp_path / "data"})
    held = make_store(engine, None, 384)
    held.upsert([], [])  # creates the empty shard and keeps it open: the Retriever must wait
    stages = {
        name: StageOptions(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
        for name in DEPLOYMENTS
    }
    cfg = GraphConfig(engine=engine, stages=stages, sample_corpus=True)
    sample = sample_documents()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_graph(cfg), name=APP_NAME, route_prefix="/")
        # Every stage is up; only the seeding is outstanding, and it cannot finish.
        seen = []
        for _ in range(5):
            r = _readyz(url)
            if r is not None:
                seen.append((r.status_code, r.json()["stages"]["retriever"]))
            time.sleep(1)
        assert seen and all(s == (503, False) for s in seen), seen
        held.close()

        deadline = time.monotonic() + 300
        while (r := _readyz(url)) is None or r.status_code != 200:
            assert time.monotonic() < deadline, "not ready 300 s after the store was released"
            time.sleep(0.5)
        retriever = serve.get_deployment_handle("Retriever", app_name=APP_NAME)
        assert retriever.count.remote().result() == len(sample)
        doc = httpx.get(f"{url}/v1/documents/{sample[0].id}", timeout=30)
        assert doc.status_code == 200, doc.text
    finally:
        serve.shutdown()
        ray.shutdown()
        held.close()
