"""Secure by default: keys on every route but the public ones, per-key rate limits (429), no
open server on a reachable address by accident, and keys that never show in an error, a log
line or the arguments Ray Serve stores."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from qaserve.config import ApiKey, RateLimit, ServerConfig, key_digest
from qaserve.errors import RateLimited
from qaserve.runtime.api import build_app
from qaserve.runtime.keys import PUBLIC_MOUNTS, PUBLIC_PATHS, app_routes, require_keys
from qaserve.runtime.ratelimit import RateLimiter
from qaserve.runtime.server import check_exposure, exposure_refusal, is_loopback
from qaserve_client import errors
from qaserve_client.client import Client, Retry

QASERVE = str(Path(sys.executable).with_name("qaserve"))
READ, WRITE = "security-read-0001", "security-write-0002"
KEYS = [ApiKey(key=READ), ApiKey(key=WRITE, write=True)]


def keyed_app(**server: Any) -> Any:
    """The app with keys, no backend behind it: every check here happens before one is needed."""
    return build_app(None, ServerConfig(api_keys=KEYS, **server))


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


# --- every route needs a key -------------------------------------------------------------------


def protected_calls(app: Any) -> list[tuple[str, str]]:
    calls = []
    for route in app_routes(app):
        path = getattr(route, "path", "")
        if path in PUBLIC_PATHS or path in PUBLIC_MOUNTS:
            continue
        for method in sorted(getattr(route, "methods", None) or ["GET"]):
            if method != "HEAD":
                calls.append((method, concrete(path)))
    return calls


def test_every_route_but_the_public_ones_refuses_an_anonymous_caller() -> None:
    app = keyed_app()
    client = TestClient(app)
    calls = protected_calls(app)
    # the enumeration covers every path the OpenAPI document lists (and the unlisted ones)
    documented = {
        (method.upper(), concrete(path))
        for path, ops in app.openapi()["paths"].items()
        for method in ops
        if path not in PUBLIC_PATHS
    }
    assert documented <= set(calls), documented - set(calls)
    assert {"/v1/models", "/v1/documents/x", "/openai/v1/models", "/openai/v1/x"} <= {
        p for _, p in calls
    }
    for method, path in calls:
        for headers in ({}, {"X-API-Key": "not-a-configured-key"}):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    # and the public ones answer without a key
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # not ready (no backend), not 401
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/"):
        assert client.get(path).status_code == 200, path
    assert client.get("/playground/playground.js").status_code == 200


def test_a_read_key_reads_and_only_a_write_key_writes() -> None:
    client = TestClient(keyed_app())
    # past the key check, the app without a backend answers 503 "starting"
    assert client.get("/v1/models", headers={"X-API-Key": READ}).status_code == 503
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {WRITE}"}).status_code == 503
    body = {"documents": [{"text": "x"}]}
    read_only = client.post("/v1/documents", json=body, headers={"X-API-Key": READ})
    assert read_only.status_code == 403
    assert client.post("/v1/documents", json=body, headers={"X-API-Key": WRITE}).status_code == 503
    # a configured key's digest is not the key
    digest = {"X-API-Key": key_digest(READ)}
    assert client.get("/v1/models", headers=digest).status_code == 401


def test_a_route_added_without_a_key_check_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from qaserve.runtime import playground

    register = playground.register

    def register_and_forget(app: Any) -> None:  # a module that adds a route, no key check
        register(app)

        @app.get("/v1/forgotten")
        async def forgotten() -> dict[str, str]:
            return {}

    monkeypatch.setattr(playground, "register", register_and_forget)
    with pytest.raises(RuntimeError, match="'/v1/forgotten' has no API key check"):
        keyed_app()
    monkeypatch.undo()
    app = keyed_app()

    @app.get("/v1/later")  # added after build_app: checked on demand
    async def later() -> dict[str, str]:
        return {}

    with pytest.raises(RuntimeError, match="'/v1/later' has no API key check"):
        require_keys(app, app.state.keys)


def test_openapi_declares_the_key_schemes_on_protected_routes() -> None:
    spec = keyed_app().openapi()
    schemes = spec["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path in PUBLIC_PATHS:
                assert "security" not in op, (method, path)
                continue
            assert {name for s in op["security"] for name in s} == set(schemes), (method, path)
            assert {"401", "429"} <= set(op["responses"]), (method, path)


# --- keys never shown --------------------------------------------------------------------------


def test_a_short_key_is_refused_without_showing_it() -> None:
    from pydantic import ValidationError

    from qaserve.runtime.graph_config import GraphConfig

    with pytest.raises(ValidationError) as caught:
        GraphConfig.model_validate({"server": {"api_keys": [{"key": "s3cr"}]}})
    assert "s3cr" not in str(caught.value) and "at least 8 characters" in str(caught.value)
    # an error elsewhere in the config does not print the keys beside it either
    with pytest.raises(ValidationError) as caught:
        GraphConfig.model_validate({"server": {"api_keys": [{"key": READ}], "timeout_s": "x"}})
    assert READ not in str(caught.value)


def test_config_dumps_and_ray_args_carry_digests_not_keys() -> None:
    from ray import cloudpickle

    from qaserve.runtime.graph import build_graph
    from qaserve.runtime.graph_config import GraphConfig

    cfg = GraphConfig.model_validate({"server": {"api_keys": [{"key": WRITE, "write": True}]}})
    assert WRITE not in repr(cfg) and WRITE not in cfg.model_dump_json()
    args = cloudpickle.dumps(build_graph(cfg)._bound_deployment.init_args)
    assert WRITE.encode() not in args and key_digest(WRITE).encode() in args
    # what the ingress rebuilds from those args admits the key itself
    shipped = ServerConfig.model_validate(cfg.server.model_dump(mode="json"))
    client = TestClient(build_app(None, shipped))
    assert client.post("/v1/documents", json={}, headers={"X-API-Key": WRITE}).status_code == 422
    assert client.get("/v1/models", headers={"X-API-Key": "wrong-key-000"}).status_code == 401


def test_deploy_sends_digests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qaserve.runtime.cluster import deploy_config

    graph = tmp_path / "graph.yaml"
    graph.write_text(f"server:\n  api_keys:\n    - {{key: {WRITE}, write: true}}\n")
    sent = deploy_config(graph, {})
    assert WRITE not in str(sent) and key_digest(WRITE) in str(sent)
    graph.write_text("server:\n  timeout_s: 30\n")  # keys from this machine's environment
    monkeypatch.setenv("QASERVE_API_KEYS", f"{READ}:r")
    sent = deploy_config(graph, {})
    assert READ not in str(sent) and key_digest(READ) in str(sent)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process group: if it does start a server (the refusal missing),
    the timeout takes the whole group down, Ray's processes included."""
    base = {k: v for k, v in os.environ.items() if k != "QASERVE_API_KEYS"}
    proc = subprocess.Popen(
        [QASERVE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**base, **(env or {})},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_the_cli_refuses_a_short_key_in_one_line_without_it(tmp_path: Path) -> None:
    graph = tmp_path / "short.yaml"
    graph.write_text('server:\n  api_keys:\n    - key: "s3cr"\n')
    done = run_cli("serve", "--config", str(graph), "--no-sample")
    assert done.returncode == 2, done.stderr
    assert "s3cr" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "qaserve: error: invalid GraphConfig: server.api_keys.0.key: "
        "String should have at least 8 characters"
    ]
    done = run_cli("serve", "--no-sample", env={"QASERVE_API_KEYS": "s3cr:rw"})
    assert done.returncode == 2 and "s3cr" not in done.stdout + done.stderr
    assert "QASERVE_API_KEYS entry 0: a key needs at least 8 characters" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_old_setting_is_named(tmp_path: Path) -> None:
    graph = tmp_path / "old.yaml"
    graph.write_text("server:\n  require_key_for_reads: true\n")
    done = run_cli("serve", "--config", str(graph), "--no-sample")
    assert done.returncode == 2
    assert "server.require_key_for_reads: Extra inputs are not permitted" in done.stderr


# --- no open server on a reachable address -----------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "10.0.0.1"])
def test_reachable_addresses(host: str) -> None:
    assert not is_loopback(host)
    assert exposure_refusal(host, ServerConfig(api_keys=[]))
    assert exposure_refusal(host, ServerConfig(api_keys=KEYS)) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)
    assert exposure_refusal(host, ServerConfig(api_keys=[])) is None


def test_serve_on_a_public_address_without_keys_exits_before_ray() -> None:
    done = run_cli("serve", "--host", "0.0.0.0", "--config", "local.yaml", "--no-sample")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "qaserve: error: refusing to listen on 0.0.0.0 without API keys"
    )
    assert "--allow-unauthenticated-public-access" in lines[0]
    assert "ray" not in (done.stdout + done.stderr).lower()  # nothing started
    deploy = run_cli("deploy", "--address", "http://127.0.0.1:9", "--config", "local.yaml")
    assert deploy.returncode == 2 and "refusing to listen on 0.0.0.0" in deploy.stderr


def test_the_flag_allows_it_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    assert not check_exposure("0.0.0.0", ServerConfig(api_keys=[]), allowed=False)
    assert check_exposure("0.0.0.0", ServerConfig(api_keys=[]), allowed=True)
    assert "WARNING: listening on 0.0.0.0 WITHOUT API KEYS" in capsys.readouterr().err
    assert check_exposure("0.0.0.0", ServerConfig(api_keys=KEYS), allowed=False)


# --- rate limits -------------------------------------------------------------------------------


def test_a_token_bucket_refills_at_its_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0], max_callers=2)
    limit = RateLimit(requests_per_s=0.5, burst=2)
    limiter.check("a", limit)
    limiter.check("a", limit)
    with pytest.raises(RateLimited) as caught:
        limiter.check("a", limit)
    assert caught.value.retry_after == 2  # one token back in 1 / 0.5 s
    limiter.check("b", limit)  # another caller, another bucket
    now[0] += 1.5
    with pytest.raises(RateLimited) as caught:
        limiter.check("a", limit)
    assert caught.value.retry_after == 1  # 0.5 s left, rounded up
    now[0] += 0.5
    limiter.check("a", limit)
    limiter.check("x", None)  # no limit, no bucket
    now[0] += 10  # both buckets full again
    limiter.check("a", limit)  # "a" spends a token
    limiter.check("c", limit)  # a third caller: the full bucket ("b") makes room
    assert set(limiter.buckets) == {"a", "c"}


def test_over_its_limit_a_key_gets_429_and_others_do_not(api_server: Any, serve_app: Any) -> None:
    limit = RateLimit(requests_per_s=1, burst=2)
    url = serve_app(build_app(api_server.backend, ServerConfig(api_keys=KEYS, rate_limit=limit)))
    a, b = {"X-API-Key": READ}, {"X-API-Key": WRITE}
    with httpx.Client(base_url=url, timeout=60) as http:
        assert [http.get("/v1/models", headers=a).status_code for _ in range(2)] == [200, 200]
        limited = http.get("/v1/models", headers=a)
        assert limited.status_code == 429
        assert limited.json()["error"]["type"] == "rate_limited"
        wait = int(limited.headers["retry-after"])
        assert wait == 1
        assert http.get("/v1/models", headers=b).status_code == 200  # its own bucket
        assert http.get("/healthz").status_code == 200  # probes are never limited
        assert http.get("/readyz").status_code == 200
        chat = {"model": "qaserve", "messages": [{"role": "user", "content": "hi"}]}
        openai = http.post("/openai/v1/chat/completions", json=chat, headers=a)
        assert openai.status_code == 429 and openai.json()["error"]["code"] == "rate_limit_exceeded"
        assert openai.headers["retry-after"]
        time.sleep(wait)
        assert http.get("/v1/models", headers=a).status_code == 200  # a token is back


def test_a_key_can_have_its_own_limit(api_server: Any, serve_app: Any) -> None:
    own = ApiKey(key="security-own-0003", rate_limit=RateLimit(requests_per_s=0.01, burst=1))
    url = serve_app(build_app(api_server.backend, ServerConfig(api_keys=[own, *KEYS])))
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/v1/models", headers={"X-API-Key": own.key}).status_code == 200
        limited = http.get("/v1/models", headers={"X-API-Key": own.key})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 1
        # no default limit: the other keys are not limited at all
        assert all(
            http.get("/v1/models", headers={"X-API-Key": READ}).status_code == 200 for _ in range(5)
        )


def test_without_keys_callers_are_limited_by_address(api_server: Any, serve_app: Any) -> None:
    limit = RateLimit(requests_per_s=0.01, burst=1)
    url = serve_app(build_app(api_server.backend, ServerConfig(api_keys=[], rate_limit=limit)))
    assert httpx.get(f"{url}/v1/models").status_code == 200
    assert httpx.get(f"{url}/v1/models").status_code == 429


def test_the_sdk_raises_rate_limited_or_waits_retry_after(api_server: Any, serve_app: Any) -> None:
    limit = RateLimit(requests_per_s=1, burst=1)
    url = serve_app(build_app(api_server.backend, ServerConfig(api_keys=KEYS, rate_limit=limit)))
    with Client(url, api_key=READ, retry=Retry(attempts=0)) as once:
        once.models()
        with pytest.raises(errors.RateLimited) as caught:
            once.models()
    assert (caught.value.status, caught.value.type, caught.value.retry_after) == (
        429,
        "rate_limited",
        1.0,
    )
    with Client(url, api_key=READ, retry=Retry(attempts=2)) as patient:
        patient.models()  # waits the Retry-After it is told, then gets through
        patient.models()
