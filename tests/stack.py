"""The whole suite in the test's event loop: api, stream and scheduler behind a gateway.

Each app runs its real factory on its own test server; they share back ends through the
settings (the same ``memory://`` names, or the real servers), exactly as in standalone
mode. Tests talk to the gateway only, as a client would.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api_service.app import create_app as create_api_app
from gateway.app import create_app as create_gateway_app
from scheduler_service.app import create_app as create_scheduler_app
from shared.settings import Settings
from stream_service.app import create_app as create_stream_app

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ClientFactory = Callable[[TestServer], Awaitable[TestClient[web.Request, web.Application]]]

PASSWORD = "correct horse battery"


@dataclass
class Stack:
    gateway: TestClient[web.Request, web.Application]
    settings: Settings
    servers: dict[str, TestServer]

    async def sign_up(self, username: str | None = None) -> dict[str, Any]:
        username = username or f"user_{secrets.token_hex(4)}"
        response = await self.gateway.post(
            "/api/v1/users", json={"username": username, "password": PASSWORD}
        )
        assert response.status == 201, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    async def sign_in(self, username: str) -> dict[str, Any]:
        response = await self.gateway.post(
            "/api/v1/sessions", json={"username": username, "password": PASSWORD}
        )
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    async def new_user(self, username: str | None = None) -> dict[str, str]:
        """A fresh signed-in user: the ``Authorization`` header to send as them."""
        user = await self.sign_up(username)
        tokens = await self.sign_in(user["username"])
        return {"Authorization": f"Bearer {tokens['access_token']}"}


async def start_stack(
    settings: Settings, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> Stack:
    servers = {
        "api": await aiohttp_server(create_api_app(settings)),
        "stream": await aiohttp_server(create_stream_app(settings)),
        "scheduler": await aiohttp_server(create_scheduler_app(settings)),
    }

    def url(name: str) -> str:
        return str(servers[name].make_url("")).rstrip("/")

    settings = dataclasses.replace(
        settings, api_url=url("api"), stream_url=url("stream"), scheduler_url=url("scheduler")
    )
    gateway_server = await aiohttp_server(create_gateway_app(settings))
    servers["gateway"] = gateway_server
    return Stack(gateway=await aiohttp_client(gateway_server), settings=settings, servers=servers)
