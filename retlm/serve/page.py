"""The web page of `retlm serve`: plain HTML, CSS and JavaScript files shipped inside the package and
served by the same app, so the page needs no network beyond the server (no CDN, no build step).

The page is a static shell: it holds no model output, database text or settings, and it talks to the
server only through the JSON API (``/v1/models``, ``/v1/search``, ``/v1/completions``,
``/v1/chat/completions``). So it is served without the API key, and it asks for the key (kept in the
tab's session storage) when the API answers 401; the API routes keep requiring it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

FILES = {"index.html": "text/html", "page.js": "text/javascript", "page.css": "text/css"}
PUBLIC_PATHS = frozenset({"/", "/health", *(f"/static/{name}" for name in FILES)})


@cache
def read(name: str) -> bytes:
    """One of the page's files, from the installed package."""
    return resources.files("retlm.serve").joinpath("static", name).read_bytes()


def add_page_routes(app: FastAPI) -> None:
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(read("index.html"), media_type="text/html; charset=utf-8", headers=headers)

    def route(name: str, kind: str):  # a closure per file: the route takes no parameter at all
        async def serve() -> Response:
            return Response(read(name), media_type=f"{kind}; charset=utf-8", headers=headers)

        return serve

    for name, kind in FILES.items():
        app.add_api_route(f"/static/{name}", route(name, kind), methods=["GET"], include_in_schema=False)
