"""Suite-wide settings: offline, bounded threads, and a private data dir per test session."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="module", autouse=True)
def _environment_per_module() -> Iterator[None]:
    """Each test module leaves os.environ as it found it: `ray.init` sets RAY_AUTH_MODE=token
    in the process, and a Ray cluster started later in the session (tests/test_cluster.py)
    then puts its dashboard behind a token the harness does not send."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# --- a served engine on tiny models (tests/tiny_models.py), shared by API, SDK and Ray tests ---

WRITE_KEY = "test-write-key-0001"
READ_KEY = "test-read-key-0002"


@pytest.fixture(scope="session")
def tiny_engine_config(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """EngineConfig: tiny random reader and generator, packaged MiniLM, a temp data dir."""
    from tiny_models import tiny_engine_config as build

    return build(Path(tmp_path_factory.mktemp("tiny-engine")))


@pytest.fixture(scope="session")
def serve_app() -> Iterator[Callable[[Any], str]]:
    """Start an ASGI app under uvicorn on 127.0.0.1 (a free port) in a thread; returns its
    base URL. Every server started stops at the end of the session."""
    import uvicorn

    servers: list[tuple[Any, threading.Thread]] = []

    def start(app: Any) -> str:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 120
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server, _ in servers:
        server.should_exit = True
    for _, thread in servers:
        thread.join(10)


@dataclass(frozen=True)
class ApiServer:
    url: str
    write_key: str
    read_key: str
    backend: Any  # the local Pipeline behind it


@pytest.fixture(scope="session")
def local_backend(tiny_engine_config: Any) -> Iterator[Any]:
    from qaserve.runtime.local import local_pipeline

    backend = local_pipeline(tiny_engine_config, workers=2)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def api_server(local_backend: Any, serve_app: Callable[[Any], str]) -> ApiServer:
    """The app over the tiny engine: a write key and a read key, reads open, 64 KiB bodies."""
    from qaserve.config import ApiKey, ServerConfig
    from qaserve.runtime.api import build_app

    cfg = ServerConfig(
        api_keys=[ApiKey(key=WRITE_KEY, write=True), ApiKey(key=READ_KEY)],
        max_body_bytes=64 * 1024,
    )
    return ApiServer(serve_app(build_app(local_backend, cfg)), WRITE_KEY, READ_KEY, local_backend)


@pytest.fixture(scope="module")
def qa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random extractive-QA checkpoint (tiny_models.tiny_qa_checkpoint), per module."""
    from tiny_models import tiny_qa_checkpoint

    return tiny_qa_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX export cache folder shared by one module's tests."""
    return tmp_path_factory.mktemp("onnx-cache")
