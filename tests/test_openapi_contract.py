"""The OpenAPI document is the contract: schemathesis (`--checks all`, every phase) against
the app over the tiny engine, plus the declarations it relies on.

The run is bounded (a few examples per operation, deterministic generation, one worker) so it
fits `make test`; the server counts the requests it answered and the test prints the figure.
Every operation, every phase and every check runs. Two settings differ from schemathesis's
defaults, each with its reason where it is set: `negative_data_rejection` counts 413 as a
rejection, and `positive_data_acceptance` runs as a variant (tests/contract_checks.py) that
lets through the refusals by the cost bounds JSON Schema cannot state, and nothing else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import READ_KEY, WRITE_KEY
from starlette.types import ASGIApp, Receive, Scope, Send

from qaserve.config import ApiKey, ServerConfig
from qaserve.runtime.api import build_app
from qaserve_client.schema import COLLECTION_PATTERN, MAX_COLLECTION_CHARS, NON_BLANK

pytestmark = pytest.mark.slow  # the retriever is the real packaged MiniLM

# schemathesis's `negative_data_rejection` statuses by default (4.32)
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]
MAX_EXAMPLES = 25  # per operation and phase: ~1,800 requests, under a minute


class RequestCount:
    """ASGI wrapper counting the HTTP requests the app answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def contract_server(
    tiny_engine_config: Any,
    tmp_path_factory: pytest.TempPathFactory,
    serve_app: Callable[[Any], str],
) -> Iterator[tuple[str, RequestCount]]:
    """The app over its own tiny engine and store (schemathesis writes and deletes documents
    at random: the shared `api_server` store stays out of its reach), keys as `api_server`."""
    from qaserve.runtime.local import local_pipeline

    data = tmp_path_factory.mktemp("contract-data")
    backend = local_pipeline(tiny_engine_config.model_copy(update={"data_dir": data}), workers=2)
    cfg = ServerConfig(
        api_keys=[ApiKey(key=WRITE_KEY, write=True), ApiKey(key=READ_KEY)],
        max_body_bytes=64 * 1024,
    )
    app = RequestCount(build_app(backend, cfg))
    yield serve_app(app), app
    backend.close()


def test_schemathesis_finds_nothing(
    contract_server: tuple[str, RequestCount], tmp_path: Path
) -> None:
    url, counter = contract_server
    # A body over max_body_bytes is refused with 413 before it is read: a rejection of
    # invalid data as much as those of schemathesis's default list, which lacks 413.
    config = tmp_path / "schemathesis.toml"
    rejections = [*REJECTIONS, "413"]
    config.write_text(f"[checks.negative_data_rejection]\nexpected-statuses = {rejections!r}\n")
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(config)),
        *("run", f"{url}/openapi.json"),
        *("--checks", "all"),
        # in its variant positive_data_acceptance_within_cost_bounds (contract_checks.py)
        *("--exclude-checks", "positive_data_acceptance"),
        *("--max-examples", str(MAX_EXAMPLES)),
        "--generation-deterministic",  # the same requests every run, no example database
        *("--workers", "1"),
        *("--request-timeout", "60"),
        *("--header", f"Authorization: Bearer {WRITE_KEY}"),  # writes are exercised too
        "--no-color",
    ]
    hooks = {"SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("contract_checks.py"))}
    env = {**os.environ, **hooks}  # cwd: the test's folder, so nothing lands in the repository
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    print(f"schemathesis: {counter.requests} requests answered")
    assert done.returncode == 0, done.stdout[-20_000:] + done.stderr[-5_000:]
    assert counter.requests > 500, done.stdout[-5_000:]  # the run did happen


# --- what the run relies on, stated directly --------------------------------------------------


@pytest.fixture(scope="module")
def openapi(contract_server: tuple[str, RequestCount]) -> dict[str, Any]:
    return httpx.get(f"{contract_server[0]}/openapi.json").json()


def _statuses(openapi: dict[str, Any], path: str, method: str) -> set[str]:
    return set(openapi["paths"][path][method]["responses"])


def test_each_route_documents_the_errors_it_can_answer(openapi: dict[str, Any]) -> None:
    keyed = {"401", "429", "500", "503"}
    body = {"413", "415", "422"}
    call = {"400", "504"}
    for path in ("/v1/retrieve", "/v1/read", "/v1/generate", "/v1/query"):
        assert _statuses(openapi, path, "post") == {"200"} | keyed | call | body, path
    ingest = _statuses(openapi, "/v1/documents", "post")
    assert ingest >= {"200", "403"} | keyed | call | body
    assert _statuses(openapi, "/v1/documents/{doc_id}", "get") == {"200", "404", "422"} | (
        keyed | call
    )
    assert _statuses(openapi, "/v1/documents/{doc_id}", "delete") == {
        "204",
        "403",
        "404",
        "422",
    } | (keyed | call)
    # no blanket list: a route without a body cannot answer 413/415, a read cannot answer 403
    assert _statuses(openapi, "/v1/models", "get") == {"200"} | keyed | call
    assert _statuses(openapi, "/readyz", "get") == {"200", "503"}
    assert _statuses(openapi, "/healthz", "get") == {"200"}
    chat = _statuses(openapi, "/openai/v1/chat/completions", "post")
    assert chat == {"200", "400", "401", "404", "413", "415", "429", "500", "503", "504"}
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and path != "/readyz":
                    schema = response["content"]["application/json"]["schema"]["$ref"]
                    assert schema.endswith("ErrorResponse"), (path, method, status)


def test_retry_after_and_www_authenticate_are_documented(openapi: dict[str, Any]) -> None:
    responses = openapi["paths"]["/v1/query"]["post"]["responses"]
    assert "Retry-After" in responses["429"]["headers"]
    assert "Retry-After" in responses["503"]["headers"]
    assert "WWW-Authenticate" in responses["401"]["headers"]


def _resolve(openapi: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return openapi["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def _body(openapi: dict[str, Any], path: str) -> dict[str, Any]:
    content = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return _resolve(openapi, content["schema"])


def test_blank_texts_are_documented_as_refused(openapi: dict[str, Any]) -> None:
    """The server strips and refuses blank questions, queries and texts: the schema says so,
    or schemathesis's valid bodies ("" or "  ") would be answered 422."""
    texts = [
        _body(openapi, "/v1/query")["properties"]["question"],
        _body(openapi, "/v1/retrieve")["properties"]["query"],
        _body(openapi, "/v1/read")["properties"]["question"],
        _body(openapi, "/v1/generate")["properties"]["question"],
        openapi["components"]["schemas"]["DocumentIn"]["properties"]["text"],
        openapi["components"]["schemas"]["ReadDocument"]["properties"]["text"],
    ]
    for text in texts:
        assert text["minLength"] == 1
        assert text["pattern"] == NON_BLANK


def test_the_blank_pattern_is_pythons_whitespace() -> None:
    """NON_BLANK spells out what str.strip removes, character by character."""
    pattern = re.compile(NON_BLANK)
    disagree = [
        hex(c) for c in range(0x110000) if chr(c).isspace() != (pattern.search(chr(c)) is None)
    ]
    assert disagree == []


def test_collection_has_one_rule_everywhere(openapi: dict[str, Any]) -> None:
    rule = {"pattern": COLLECTION_PATTERN, "maxLength": MAX_COLLECTION_CHARS, "minLength": 1}
    found = [
        _body(openapi, path)["properties"]["collection"]["anyOf"][0]
        for path in ("/v1/documents", "/v1/retrieve", "/v1/query", "/openai/v1/chat/completions")
    ]
    for method in ("get", "delete"):
        for parameter in openapi["paths"]["/v1/documents/{doc_id}"][method]["parameters"]:
            if parameter["name"] == "collection":
                found.append(parameter["schema"]["anyOf"][0])
    assert len(found) == 6
    for schema in found:
        assert {k: schema.get(k) for k in rule} == rule
