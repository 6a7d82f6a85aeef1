"""The HTTP app's ASGI middleware: what runs before a request is parsed (body size, admission).

Each class wraps the app as plain ASGI, so a refused request costs no parsing and no backend call.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qaserve.errors import Overloaded, PayloadTooLarge
from qaserve.runtime.responses import error_response


class BodyLimit:
    """413 for bodies over `limit` bytes, by Content-Length or by counting a chunked body.

    The body is read here (FastAPI would read it whole anyway) and replayed to the app, so
    nothing downstream parses a byte of an oversized request.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"request body larger than {self.limit} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(too_large)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await error_response(too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # disconnect notices while streaming
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class Admission:
    """503 + Retry-After beyond `limit` API requests in flight (streams count until done):
    the v1 API and the OpenAI-compatible routes; the page and the probes are not counted."""

    def __init__(self, app: ASGIApp, limit: int, retry_after: int) -> None:
        self.app = app
        self.limit = limit
        self.retry_after = retry_after
        self.ongoing = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/v1/", "/openai/v1/")):
            await self.app(scope, receive, send)
            return
        if self.ongoing >= self.limit:
            busy = Overloaded(f"more than {self.limit} requests in flight; retry later")
            await error_response(busy, self.retry_after)(scope, receive, send)
            return
        self.ongoing += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.ongoing -= 1
