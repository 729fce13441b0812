"""The gateway's URL table: its own documents, then one route per routing-table entry."""

from __future__ import annotations

from aiohttp import web

from gateway.handlers.openapi import get_openapi_document
from gateway.handlers.proxy import forward_to
from gateway.handlers.web import get_index, get_static, web_files
from gateway.proxy.table import API_PREFIX, ROUTE_TABLE


def setup_routes(app: web.Application) -> None:
    # The web front end (gateway/web): the page at "/", its files under "/static/".
    files = web_files()
    app.router.add_get("/", get_index(files), name="get_index")
    app.router.add_get("/static/{path:.+}", get_static(files), name="get_static")
    app.router.add_get(
        API_PREFIX + "/openapi.json", get_openapi_document, name="get_openapi_document"
    )
    for route in ROUTE_TABLE:
        # Every method: which ones a path allows is the upstream's to say (405 included).
        app.router.add_route("*", route.path, forward_to(route), name=f"forward_{route.name}")
