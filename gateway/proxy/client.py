"""The gateway's one HTTP client to its upstreams: replica choice, failover, error mapping.

Failures are turned into problem documents here, before a response has started:

- a replica that refuses the connection is skipped for the next one (nothing was sent, so
  trying again is safe whatever the method); when every replica refuses → 502
  ``upstream_unavailable``;
- a connect or response-header timeout → 504 ``upstream_timeout``;
- a reset, a disconnect or a malformed response before the headers → 502.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Final

from aiohttp import (
    ClientConnectorError,
    ClientError,
    ClientResponse,
    ClientSession,
    ClientTimeout,
    ClientWebSocketResponse,
    ClientWSTimeout,
    DummyCookieJar,
    TCPConnector,
    WSServerHandshakeError,
)
from yarl import URL

from gateway.proxy.table import Service
from gateway.proxy.upstreams import ReplicaSet
from shared.errors import AppError, BadGatewayError, GatewayTimeoutError
from shared.settings import Settings

logger = logging.getLogger(__name__)

# Open upstream connections across all services: each streamed download or upload holds
# one for its whole length, so this caps concurrent proxied transfers, well under the
# process's 20,000 file descriptors (a proxied exchange uses two).
CONNECTION_LIMIT: Final = 2048
# Bytes buffered per upstream response before reading pauses: large enough for a fast
# loopback stream, small enough that thousands of streams stay flat in memory.
READ_BUFFER_BYTES: Final = 256 * 1024
HEALTH_PROBE_TIMEOUT: Final = 1.0
WEBSOCKET_MAX_MESSAGE_BYTES: Final = 64 * 1024
WEBSOCKET_HEARTBEAT_SECONDS: Final = 30.0
WEBSOCKET_CLOSE_TIMEOUT: Final = 5.0

# aiohttp would otherwise add its own Accept, Accept-Encoding, User-Agent and (for a
# streamed body) Content-Type: an upstream must see what the client sent, and in
# particular must not gzip a body for a client that never offered gzip.
_NO_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

BodyFactory = Callable[[], AsyncIterable[bytes] | None]


class NoHealthyReplicaError(Exception):
    """No replica of a service answered its health probe."""


class UpstreamRejectedUpgradeError(Exception):
    """The upstream answered a WebSocket handshake with something other than 101."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str]) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.headers = headers


def create_client_session(settings: Settings) -> ClientSession:
    """The session every proxied request shares (one connection pool per process)."""
    return ClientSession(
        connector=TCPConnector(limit=CONNECTION_LIMIT, limit_per_host=0),
        # Bytes pass as the upstream encoded them; Content-Encoding travels with them.
        auto_decompress=False,
        # One jar for every user would leak one user's cookies into another's requests.
        cookie_jar=DummyCookieJar(),
        skip_auto_headers=_NO_AUTO_HEADERS,
        timeout=ClientTimeout(
            total=None,
            connect=settings.upstream_connect_timeout,
            # Time without a byte once the request is sent: bounds the wait for the
            # headers and any stall mid-body (it is paused while the client is slow).
            sock_read=settings.upstream_read_timeout,
        ),
        read_bufsize=READ_BUFFER_BYTES,
    )


def upstream_error(service: Service, exc: BaseException | None) -> AppError:
    """The problem a client sees when ``service`` could not give a response."""
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts derive from it
        return GatewayTimeoutError(
            f"The {service} service did not answer in time.", code="upstream_timeout"
        )
    return BadGatewayError(
        f"The {service} service is unavailable; try again shortly.",
        code="upstream_unavailable",
    )


class UpstreamClient:
    """Sends requests to a replica of an upstream service, failing over on refusal."""

    def __init__(self, session: ClientSession, upstreams: Mapping[Service, ReplicaSet]) -> None:
        self.session = session
        self._upstreams = upstreams

    async def request(
        self,
        service: Service,
        method: str,
        target: str,
        *,
        headers: Mapping[str, str],
        body: BodyFactory,
    ) -> ClientResponse:
        """The upstream's response, its headers read and its body not yet.

        ``target`` is the raw (still percent-encoded) path and query. ``body`` makes a
        fresh body iterator per attempt; a refused attempt never started the previous one.
        Raises an ``AppError`` (502/504) when no response can be had.
        """
        refusal: ClientConnectorError | None = None
        for base_url in self._upstreams[service].rotation():
            try:
                return await self.session.request(
                    method,
                    URL(base_url + target, encoded=True),
                    headers=headers,
                    data=body(),
                    allow_redirects=False,
                )
            except ClientConnectorError as exc:
                logger.warning("replica %s of %s refused: %s", base_url, service, exc)
                refusal = exc
            except (ClientError, TimeoutError) as exc:
                logger.warning("replica %s of %s failed: %r", base_url, service, exc)
                raise upstream_error(service, exc) from None
        raise upstream_error(service, refusal) from None

    async def connect_websocket(
        self,
        service: Service,
        target: str,
        *,
        headers: Mapping[str, str],
        protocols: Iterable[str],
    ) -> ClientWebSocketResponse:
        """An open WebSocket to a replica of ``service``.

        Raises ``UpstreamRejectedUpgradeError`` when the upstream declines the upgrade,
        an ``AppError`` (502/504) when it cannot be reached.
        """
        refusal: ClientConnectorError | None = None
        for base_url in self._upstreams[service].rotation():
            try:
                return await self.session.ws_connect(
                    URL(base_url + target, encoded=True),
                    headers=headers,
                    protocols=tuple(protocols),
                    compress=0,
                    max_msg_size=WEBSOCKET_MAX_MESSAGE_BYTES,
                    # Close frames are answered by the bridge, with the peer's own code.
                    autoclose=False,
                    heartbeat=WEBSOCKET_HEARTBEAT_SECONDS,
                    timeout=ClientWSTimeout(ws_receive=None, ws_close=WEBSOCKET_CLOSE_TIMEOUT),
                )
            except WSServerHandshakeError as exc:
                raise UpstreamRejectedUpgradeError(
                    exc.status, exc.message, exc.headers or {}
                ) from None
            except ClientConnectorError as exc:
                logger.warning("replica %s of %s refused: %s", base_url, service, exc)
                refusal = exc
            except (ClientError, TimeoutError) as exc:
                logger.warning("replica %s of %s failed: %r", base_url, service, exc)
                raise upstream_error(service, exc) from None
        raise upstream_error(service, refusal) from None

    async def check_ready(self, service: Service) -> None:
        """Returns when at least one replica of ``service`` answers ``/healthz`` with 200."""
        urls = self._upstreams[service].urls
        results = await asyncio.gather(*(self._probe(url) for url in urls))
        if not any(results):
            raise NoHealthyReplicaError(f"no replica of {service} is healthy")

    async def _probe(self, base_url: str) -> bool:
        try:
            async with self.session.get(
                base_url + "/healthz", timeout=ClientTimeout(total=HEALTH_PROBE_TIMEOUT)
            ) as response:
                return response.status == HTTPStatus.OK
        except (ClientError, TimeoutError):
            return False
