"""The public API's OpenAPI document, served as kept in the repository."""

from __future__ import annotations

from aiohttp import web

from gateway.keys import OPENAPI_DOCUMENT


async def get_openapi_document(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[OPENAPI_DOCUMENT],
        content_type="application/json",
        # Changes only with a deployment; clients revalidate rather than guess.
        headers={"Cache-Control": "no-cache"},
    )
