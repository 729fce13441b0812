"""The web front end: ``/`` is the page, ``/static/...`` its CSS, JavaScript and worker.

Plain files from the package (``gateway/web``), no build step and nothing from a CDN.
The page is one document with hash routes (``#/videos/<id>``), so ``/`` is the only
HTML path. The Content-Security-Policy allows nothing but this origin: scripts, the
hashing worker, the API (``connect-src 'self'`` includes the live WebSocket) and the
streams; no inline script or style attribute (the page sets styles through the DOM).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from shared.errors import NotFoundError

WEB_ROOT: Final = Path(str(importlib.resources.files("gateway").joinpath("web"))).resolve()

CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}

CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "worker-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "media-src 'self'",
        "connect-src 'self'",  # CSP 3: 'self' covers ws:/wss: to this host too
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    )
)

# Revalidated on every load (ETag/Last-Modified make that a 304): a deploy must reach
# browsers at once, and the files are small.
CACHE_CONTROL: Final = "no-cache"


def web_files(root: Path = WEB_ROOT) -> dict[str, Path]:
    """Every servable file of the front end by its path under ``/static/``, read once.

    Serving from this table, not from the request's path, means no "../" can reach
    beyond the front end, and no file-system call happens per request. A symlink that
    leads out of the tree is left out too.
    """
    root = root.resolve()
    return {
        path.relative_to(root).as_posix(): path
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix in CONTENT_TYPES and path.resolve().is_relative_to(root)
    }


def get_index(files: dict[str, Path]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return _file_response(files["index.html"])

    return handler


def get_static(files: dict[str, Path]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        relative = request.match_info["path"]
        path = files.get(relative)
        if path is None:
            raise NotFoundError(
                f"No file {relative!r} in the web front end.", code="static_not_found"
            )
        return _file_response(path)

    return handler


def _file_response(path: Path) -> web.StreamResponse:
    return web.FileResponse(
        path,
        headers={
            "Content-Type": CONTENT_TYPES[path.suffix],
            "Cache-Control": CACHE_CONTROL,
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
