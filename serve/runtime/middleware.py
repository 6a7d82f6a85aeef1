"""What runs before a request is parsed: body size and admission (ASGI middleware, so a refused
request costs no parsing and no backend call), and the body's media type (a route dependency).
"""

from __future__ import annotations

import anyio
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qaserve.errors import Overloaded, PayloadTooLarge, UnsupportedMediaType
from qaserve.runtime.responses import error_response

# A refused body is read to its end (and dropped) up to this much and this long, so that the
# client reads the 413 (see BodyLimit.drain); past either bound the connection is closed.
DRAIN_BYTES = 64 * 2**20
DRAIN_S = 10.0


class BodyLimit:
    """413 for bodies over `limit` bytes, by Content-Length or by counting a chunked body.

    The body is read here (FastAPI would read it whole anyway) and replayed to the app, so
    nothing downstream parses a byte of an oversized request.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        drain_bytes: int = DRAIN_BYTES,
        drain_s: float = DRAIN_S,
    ) -> None:
        self.app = app
        self.limit = limit
        self.drain_bytes = drain_bytes
        self.drain_s = drain_s

    async def drain(self, scope: Scope, receive: Receive) -> None:
        """Read and drop the rest of a refused body, bounded, before answering 413.

        A server that closes a connection with request bytes unread makes the kernel answer
        them with a reset, and a client that sends its whole body before reading (Python's
        urllib) then loses the 413 to "connection reset by peer". nginx lingers the same way.
        A client that asked `Expect: 100-continue` has sent no body: nothing to drain.
        """
        if dict(scope["headers"]).get(b"expect", b"").lower() == b"100-continue":
            return
        read = 0
        with anyio.move_on_after(self.drain_s):
            while read <= self.drain_bytes:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                read += len(message.get("body", b""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"request body larger than {self.limit} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self.drain(scope, receive)
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
                if message.get("more_body", False):
                    await self.drain(scope, receive)
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


def json_body(request: Request) -> None:
    """415 for a request body sent as anything but JSON (a dependency of the JSON routes).

    FastAPI would read such a body as bytes and answer 422 ("Input should be a valid
    dictionary"): wrong content, where the type is what is wrong. `application/json` (UTF-8
    if a charset is named) and `application/*+json` pass, as does a request without a
    Content-Type, which FastAPI reads as JSON (a missing body stays a 422).
    """
    value = request.headers.get("content-type")
    if not value:
        return
    media, *params = (part.strip().lower() for part in value.split(";"))
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
        if all(c in ("utf-8", "utf8") for c in charsets):
            return
        raise UnsupportedMediaType(f"charset {charsets[0]!r}: a JSON body is UTF-8")
    raise UnsupportedMediaType(
        f"Content-Type {media!r} is not supported: send the body as application/json"
    )
