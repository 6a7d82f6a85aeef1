"""API keys: who may read and who may write, checked per route as a FastAPI dependency."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from qaserve.config import ServerConfig
from qaserve.errors import Forbidden, Unauthorized

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


class KeyCheck:
    def __init__(self, cfg: ServerConfig) -> None:
        self.keys = [(k.key.encode(), k.write) for k in cfg.api_keys]
        self.reads_need_key = cfg.require_key_for_reads

    def check(self, presented: str | None, write: bool) -> None:
        if not self.keys:
            return
        if not presented:
            if write or self.reads_need_key:
                raise Unauthorized(
                    "an API key is required ('Authorization: Bearer KEY' or 'X-API-Key')"
                )
            return
        given = presented.encode()
        # compare_digest against every key: no early exit that would time the match
        matches = [w for k, w in self.keys if hmac.compare_digest(k, given)]
        if not matches:
            raise Unauthorized("unknown API key")
        if write and not any(matches):
            raise Forbidden("this API key may read but not write")

    def dependency(self, write: bool) -> Any:
        async def check(
            bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
            header: str | None = Depends(_key_header),
        ) -> None:
            self.check(bearer.credentials if bearer else header, write)

        return Depends(check)
