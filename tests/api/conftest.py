"""Fixtures of the api-level tests: fake upstreams and a gateway pointed at them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy

from gateway.app import create_app
from gateway.proxy.upstreams import HealthPolicy
from shared.settings import Settings
from shared.web import OPERATOR_APP, json_response

GatewayClient = TestClient[web.Request, web.Application]


@dataclass
class SeenRequest:
    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class FakeUpstream:
    """An upstream service that records what reached it and says who it is."""

    name: str
    app: web.Application = field(default_factory=web.Application)
    seen: list[SeenRequest] = field(default_factory=list)
    server: TestServer | None = None
    # What /healthz answers: 200 while healthy, 503 otherwise.
    healthy: bool = True
    probed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(SeenRequest(request.method, request.path_qs, request.headers, body))
        return json_response({"upstream": self.name, "method": request.method})

    @property
    def port(self) -> int:
        assert self.server is not None
        assert self.server.port is not None
        return self.server.port

    async def healthz(self, _request: web.Request) -> web.Response:
        self.probed.set()
        if not self.healthy:
            return json_response({"status": "failing"}, status=503)
        return json_response({"status": "ok"})


@dataclass
class Upstreams:
    api: FakeUpstream
    stream: FakeUpstream
    scheduler: FakeUpstream
    # Set at teardown: handlers that hold their answer wait on it, never on a clock.
    release: asyncio.Event
    # Starts a fake on a free port, or on ``port`` (a stopped replica coming back).
    start: Callable[..., Awaitable[FakeUpstream]]

    def env(self) -> dict[str, str]:
        return {
            "VOD_API_URL": self.api.url,
            "VOD_STREAM_URL": self.stream.url,
            "VOD_SCHEDULER_URL": self.scheduler.url,
        }


@pytest.fixture
async def upstreams(aiohttp_server: Any) -> AsyncIterator[Upstreams]:
    """Three fake upstreams, started by the test once it has added its own routes."""

    async def start(upstream: FakeUpstream, port: int | None = None) -> FakeUpstream:
        upstream.app.router.add_get("/healthz", upstream.healthz)
        upstream.app.router.add_route("*", "/{tail:.*}", upstream.echo)
        upstream.server = await aiohttp_server(upstream.app, port=port)
        return upstream

    fakes = Upstreams(
        FakeUpstream("api"),
        FakeUpstream("stream"),
        FakeUpstream("scheduler"),
        asyncio.Event(),
        start,
    )
    yield fakes
    fakes.release.set()


GatewayFactory = Callable[..., Awaitable[GatewayClient]]


@pytest.fixture
def gateway(
    aiohttp_client: Any, make_settings: Callable[..., Settings], upstreams: Upstreams
) -> GatewayFactory:
    """Starts whichever fakes are not started yet, then a gateway pointed at them."""

    async def build(
        client_kwargs: dict[str, Any] | None = None,
        *,
        health: HealthPolicy | None = None,
        **env: str,
    ) -> GatewayClient:
        for fake in (upstreams.api, upstreams.stream, upstreams.scheduler):
            if fake.server is None:
                await upstreams.start(fake)
        settings = make_settings(**{**upstreams.env(), **env})
        app = create_app(settings, health=health)
        # aiohttp's TestServer runs with handler_cancellation=True, as __main__ does.
        client: GatewayClient = await aiohttp_client(app, **(client_kwargs or {}))
        return client

    return build


OperatorsFactory = Callable[[GatewayClient], Awaitable[GatewayClient]]


@pytest.fixture
def operators(aiohttp_client: Any) -> OperatorsFactory:
    """A client of a started gateway's operators' listener (``/metrics``, the detailed
    ``/readyz``), on a server of its own as ``shared.runner`` serves it."""

    async def build(gateway_client: GatewayClient) -> GatewayClient:
        client: GatewayClient = await aiohttp_client(gateway_client.app[OPERATOR_APP])
        return client

    return build
