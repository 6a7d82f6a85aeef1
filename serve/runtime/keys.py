"""API keys: who may read and who may write, checked per route as a FastAPI dependency, and
each caller's rate limit (qaserve.runtime.ratelimit).

With any key configured, every route needs one except the public ones below (the probes,
the docs, the playground's page and its assets); `require_keys` refuses to build an app with
a route that has no key check and is not public, so a new route cannot forget it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import fastapi.routing
from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import Mount

from qaserve.config import KEY_DIGEST, ServerConfig
from qaserve.errors import Forbidden, Unauthorized
from qaserve.runtime.ratelimit import RateLimiter

# Open to anyone whatever the keys: liveness, readiness, the API's docs, the playground page.
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/"}
)
PUBLIC_MOUNTS = frozenset({"/playground"})  # the playground's static assets

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def _digest(key: str) -> bytes:
    """Keys are compared as SHA-256 digests: a configured digest (`sha256:...`, what the Ray
    ingress receives) and a key compare alike, and in constant time whatever their lengths."""
    if key.startswith(KEY_DIGEST):
        return bytes.fromhex(key.removeprefix(KEY_DIGEST))
    return hashlib.sha256(key.encode()).digest()


class KeyCheck:
    def __init__(self, cfg: ServerConfig) -> None:
        self.keys = [(_digest(k.key), k.write, k.rate_limit) for k in cfg.api_keys]
        self.default_limit = cfg.rate_limit
        self.limiter = RateLimiter()

    def check(self, presented: str | None, write: bool, client: str | None = None) -> None:
        """401 without a known key, 403 for a write with a read key, 429 over the caller's
        rate limit (by key; by client address when no keys are configured)."""
        if not self.keys:
            self.limiter.check(("address", client), self.default_limit)
            return
        if not presented:
            raise Unauthorized(
                "an API key is required ('Authorization: Bearer KEY' or 'X-API-Key')"
            )
        # Always hashed: presenting a configured digest (`sha256:...`) is not presenting the key.
        given = hashlib.sha256(presented.encode()).digest()
        # compare_digest against every key: no early exit that would time the match
        matches = [
            (i, w, limit)
            for i, (k, w, limit) in enumerate(self.keys)
            if hmac.compare_digest(k, given)
        ]
        if not matches:
            raise Unauthorized("unknown API key")
        if write and not any(w for _, w, _ in matches):
            raise Forbidden("this API key may read but not write")
        index, _, limit = matches[0]
        self.limiter.check(index, limit or self.default_limit)

    async def read(
        self,
        request: Request,
        bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
        header: str | None = Depends(_key_header),
    ) -> None:
        self.check(bearer.credentials if bearer else header, False, _client(request))

    async def write(
        self,
        request: Request,
        bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
        header: str | None = Depends(_key_header),
    ) -> None:
        self.check(bearer.credentials if bearer else header, True, _client(request))

    def dependency(self, write: bool) -> Any:
        return Depends(self.write if write else self.read)


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _calls(dependant: Dependant) -> list[Any]:
    calls = [dependant.call]
    for sub in dependant.dependencies:
        calls += _calls(sub)
    return calls


def app_routes(app: FastAPI) -> list[Any]:
    """Every route the app answers, those of included routers too (FastAPI >= 0.16x keeps an
    included router as one lazy entry of `app.routes`; its `iter_route_contexts` flattens it,
    each item forwarding `path`, `methods` and `dependant` to the effective route)."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(flatten(app.routes)) if flatten is not None else list(app.routes)


def require_keys(app: FastAPI, keys: KeyCheck) -> None:
    """Raise if a route outside the public ones has no key check: every route of the app,
    whoever adds it, is guarded by construction (tests/test_security.py calls each one)."""
    guards = (keys.read, keys.write)
    for route in app_routes(app):
        original = getattr(route, "original_route", route)
        path = getattr(route, "path", None) or repr(original)
        dependant = getattr(route, "dependant", None)
        if isinstance(original, Mount):
            guarded = path in PUBLIC_MOUNTS
        elif path in PUBLIC_PATHS:
            continue
        elif isinstance(original, APIRoute) and dependant is not None:
            guarded = any(call in guards for call in _calls(dependant))
        else:
            guarded = False
        if not guarded:
            raise RuntimeError(
                f"route {path!r} has no API key check: give it dependencies=reads (or writes), "
                "or list it in qaserve.runtime.keys.PUBLIC_PATHS if it must be open"
            )
