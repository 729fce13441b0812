"""The gateway application: the only public door of vod.

It answers CORS for browsers on other origins (``gateway.cors``), verifies who is
calling (``gateway.identity``: JWT + revocation list), stamps request ids, and relays
every ``/api/v1`` route of the routing table to a replica of the upstream service that
owns it, streaming bodies both ways and bridging WebSockets.

The gateway takes no internal token (it is where the token is added), and it never reads
a request body itself, so ``client_max_size`` only bounds what the gateway's own handlers
might read; proxied bodies stream through whatever their size.

Upstream replicas (``gateway.proxy.upstreams``): a replica whose connection fails, or
whose ``/healthz`` fails in the periodic check (every ``HealthPolicy.check_interval``
seconds, a background task of the upstream client's cleanup context), sits out a
cool-down; idempotent requests move to another replica when a connection breaks
(``gateway.proxy.client``). Counts and replica state are on ``/metrics`` of the
operators' listener (``VOD_METRICS_HOST``:``VOD_METRICS_PORT``), with the detailed
``/readyz``: the public port says only ready or not (docs/security.md).

Run it with ``handler_cancellation=True`` (``__main__`` does): the gateway faces clients
directly, and a client that hangs up must not leave its upstream request running.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import WSCloseCode, web

from gateway.cors import install as install_cors
from gateway.identity import Authenticator
from gateway.keys import (
    AUTHENTICATOR,
    OPEN_WEBSOCKETS,
    OPENAPI_DOCUMENT,
    REPLICA_SETS,
    UPSTREAM_CLIENT,
)
from gateway.proxy.client import UpstreamClient, create_client_session
from gateway.proxy.metrics import UpstreamMetrics
from gateway.proxy.table import SERVICES, Service
from gateway.proxy.upstreams import HealthPolicy, upstreams_from_settings
from gateway.routes import setup_routes
from shared.auth import TokenVerifier
from shared.resources import KV, kv_ctx
from shared.settings import Settings
from shared.web import (
    METRICS,
    READINESS_CHECKS,
    SERVER_OPTIONS,
    SETTINGS,
    CleanupContext,
    ReadinessCheck,
    create_base_app,
)

logger = logging.getLogger(__name__)

OPENAPI_RESOURCE = "openapi.json"


def create_app(settings: Settings, *, health: HealthPolicy | None = None) -> web.Application:
    """The gateway. ``health``: how upstream replicas are judged (tests pass a clock)."""
    health = health or HealthPolicy()
    app = create_base_app(
        "gateway",
        settings,
        require_internal_token=False,
        client_max_size=settings.max_json_bytes,
        public=True,
    )
    # aiohttp arms its keep-alive timer when a connection opens and again after each
    # response, and closes the connection if no complete request head has arrived when it
    # fires: set to the header timeout, it drops clients that send headers too slowly (or
    # nothing at all) and idle keep-alive connections alike. Bodies: gateway.proxy.pacing.
    app[SERVER_OPTIONS] = {"keepalive_timeout": settings.client_header_timeout}
    install_cors(app, settings.cors_origins)
    # Built here, not at first use: a gateway without a valid public key must not start.
    verifier = TokenVerifier(settings.require_public_key())
    app[REPLICA_SETS] = upstreams_from_settings(settings, health)
    upstream_metrics = UpstreamMetrics(app[METRICS].registry)
    upstream_metrics.watch(app[REPLICA_SETS].values())
    app[OPEN_WEBSOCKETS] = weakref.WeakSet()
    app.cleanup_ctx.append(kv_ctx)
    app.cleanup_ctx.append(authenticator_ctx(verifier))
    app.cleanup_ctx.append(openapi_ctx)
    app.cleanup_ctx.append(upstream_client_ctx(upstream_metrics, health.check_interval))
    app.on_shutdown.append(begin_shutdown)
    for service in SERVICES:
        app[READINESS_CHECKS][f"upstream_{service}"] = _upstream_ready(app, service)
    setup_routes(app)
    return app


def authenticator_ctx(verifier: TokenVerifier) -> CleanupContext:
    async def context(app: web.Application) -> AsyncIterator[None]:
        app[AUTHENTICATOR] = Authenticator(verifier, app[KV])
        yield

    return context


def upstream_client_ctx(metrics: UpstreamMetrics, check_interval: float | None) -> CleanupContext:
    """The upstream client, and its periodic health checks when ``check_interval`` is set."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        session = create_client_session(app[SETTINGS])
        replica_sets = app[REPLICA_SETS]
        client = UpstreamClient(session, replica_sets, metrics)
        app[UPSTREAM_CLIENT] = client
        checks = None
        if check_interval is not None:
            checks = asyncio.create_task(
                client.run_health_checks(check_interval), name="gateway-upstream-health"
            )
        try:
            yield
        finally:
            if checks is not None:
                checks.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await checks
            await session.close()

    return context


async def openapi_ctx(app: web.Application) -> AsyncIterator[None]:
    """Loads the OpenAPI document once, refusing to start if it is not valid JSON."""
    raw = await asyncio.to_thread(
        importlib.resources.files("gateway").joinpath(OPENAPI_RESOURCE).read_bytes
    )
    document: Any = orjson.loads(raw)
    if not str(document.get("openapi", "")).startswith("3."):
        raise RuntimeError(f"gateway/{OPENAPI_RESOURCE} is not an OpenAPI 3 document")
    app[OPENAPI_DOCUMENT] = raw
    yield


async def begin_shutdown(app: web.Application) -> None:
    """Runs once the listener is closed, before in-flight requests are waited for.

    Bridged WebSockets are closed with 1001 (clients reconnect to another gateway):
    left open, they would hold the shutdown for the whole grace period.
    """
    open_websockets = app[OPEN_WEBSOCKETS]
    sockets = list(open_websockets)
    logger.info(
        "shutting down: no new connections; finishing in-flight requests, closing %d WebSocket(s)",
        len(sockets),
    )
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets),
        return_exceptions=True,
    )


def _upstream_ready(app: web.Application, service: Service) -> ReadinessCheck:
    async def check() -> None:
        await app[UPSTREAM_CLIENT].check_ready(service)

    return check
