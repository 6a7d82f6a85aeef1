"""The question-answering playground: a static page at `/`, its assets under `/playground/`.

Plain HTML, CSS and JavaScript shipped in the package (`serve/assets/playground/`): no build
step, no CDN, no external fonts. The page calls the public v1 API from the browser like any
client (the same keys, limits and errors), so it needs nothing from the server but the files.
A strict Content-Security-Policy (scripts and styles from this origin only, no inline
scripts) backs up what the script does anyway: it builds the page with `textContent`, never
with HTML from the data.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "playground"
PREFIX = "/playground"

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _Assets(StaticFiles):
    """Static files with the page's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def register(app: FastAPI) -> None:
    """Serve the playground at `/` (kept out of the OpenAPI schema)."""
    app.mount(PREFIX, _Assets(directory=ASSETS), name="playground")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(
            ASSETS / "index.html",
            media_type="text/html; charset=utf-8",
            headers={**HEADERS, "Cache-Control": "no-cache"},
        )
