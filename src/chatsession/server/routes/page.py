"""The web page: ``/`` and its three static files under ``/static/``.

The files ship inside the package (``chatsession/server/static``); nothing is
fetched from the network at run time. The page needs no key to load: it
asks for one and sends it on every API call (``Authorization: Bearer``).
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, Response

from chatsession.server.errors import APIError

__all__ = ["STATIC_FILES", "router"]

#: The files served under ``/static/``, with their media types.
STATIC_FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

#: Only this origin's scripts, styles and API; no frames, no plugins.
_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_HEADERS = {
    "Content-Security-Policy": _POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

router = APIRouter(tags=["page"], include_in_schema=False)


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("chatsession.server").joinpath("static", name).read_bytes()


def _file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise APIError(404, "not_found", f"no static file {name!r}")
    return Response(
        _read(name),
        media_type=media_type,
        headers={**_HEADERS, "Cache-Control": "no-cache"},
    )


@router.get("/")
async def index() -> Response:
    """The chat page."""
    return _file("index.html")


@router.get("/static/{name}")
async def static_file(name: str) -> Response:
    """One of the page's files (``app.js``, ``app.css``, ``index.html``).

    Raises:
        APIError: 404 for any other name.
    """
    return _file(name)
