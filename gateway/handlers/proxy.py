"""The handler behind every routing-table entry: who is calling, then relay upstream."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.keys import AUTHENTICATOR, OPEN_WEBSOCKETS, UPSTREAM_CLIENT
from gateway.proxy.forward import forward_http
from gateway.proxy.table import ProxyRoute
from gateway.proxy.websocket import bridge_websocket, is_websocket_upgrade
from shared.web import SETTINGS


def forward_to(route: ProxyRoute) -> Handler:
    """The handler that relays requests matching ``route`` to its upstream service."""

    async def forward(request: web.Request) -> web.StreamResponse:
        websocket = route.websocket and is_websocket_upgrade(request)
        identity = await request.app[AUTHENTICATOR].authenticate(request, websocket=websocket)
        upstreams = request.app[UPSTREAM_CLIENT]
        internal_token = request.app[SETTINGS].internal_token
        if websocket:
            return await bridge_websocket(
                request,
                upstreams,
                route.service,
                internal_token=internal_token,
                identity=identity,
                open_websockets=request.app[OPEN_WEBSOCKETS],
            )
        return await forward_http(
            request,
            upstreams,
            route.service,
            internal_token=internal_token,
            identity=identity,
            cookies=route.cookies,
        )

    forward.__name__ = f"forward_{route.name}"
    return forward
