"""The gateway's one HTTP client to its upstreams: replica choice, failover, error mapping.

Which replica (``gateway.proxy.upstreams``): round robin among those in service. What a
failed attempt leads to, before any response has started:

- the connection could not be made (refused, unreachable, connect timeout): nothing was
  sent, so the replica is taken out for its cool-down and the request, whatever its
  method, goes to the next replica;
- the connection broke before the response headers (reset, closed): the request goes to
  the next replica (after the last one, to the same once more) only if it can be sent
  again safely, that is its method is idempotent (GET, HEAD, OPTIONS, PUT) and no byte
  of its body was taken from the client yet; a streamed body that was partly read is
  gone and never replayed, and a POST or DELETE is never sent twice. The replica is not
  taken out (a pooled connection the upstream had just closed looks the same); if it is
  really gone, the next connection to it fails;
- no response header in time → 504 ``upstream_timeout``, never retried (the upstream may
  be working on it); anything else → 502 ``upstream_unavailable``.

When every replica failed: 502 ``upstream_unavailable`` (504 if the last failure was a
timeout). Each failure and retry is counted (``gateway.proxy.metrics``).

The periodic health check (``run_health_checks``) probes every replica's ``/healthz``
and takes out those that fail, bringing back those that answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import Final

from aiohttp import (
    ClientConnectionResetError,
    ClientConnectorError,
    ClientError,
    ClientOSError,
    ClientResponse,
    ClientSession,
    ClientTimeout,
    ClientWebSocketResponse,
    ClientWSTimeout,
    ConnectionTimeoutError,
    DummyCookieJar,
    ServerDisconnectedError,
    TCPConnector,
    WSServerHandshakeError,
)
from yarl import URL

from gateway.proxy.heap import keep_freed_buffers
from gateway.proxy.metrics import UpstreamMetrics
from gateway.proxy.table import Service
from gateway.proxy.upstreams import Replica, ReplicaSet
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

# Methods whose request may be sent twice without changing the outcome (RFC 9110 §9.2.2),
# less DELETE: a repeated sign-out or video deletion would answer 401/404 for a success.
REPLAYABLE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT"})

BodyFactory = Callable[[], AsyncIterable[bytes] | None]

# Nothing reached the replica. ClientConnectorError before the others: it is a ClientOSError.
_CONNECT_FAILURES: Final = (ClientConnectorError, ConnectionTimeoutError)
# The connection broke after it was made, before the response headers.
_BROKEN_CONNECTION: Final = (ServerDisconnectedError, ClientConnectionResetError, ClientOSError)


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
    """The session every proxied request shares (one connection pool per process).

    Made once per gateway process, at start-up: the place to set how the process reuses
    the buffers proxied bodies pass through (``gateway.proxy.heap``).
    """
    keep_freed_buffers()
    session = ClientSession(
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
    # aiohttp would send GET, PUT, DELETE... once more to the same replica when the
    # connection breaks, DELETE included, which the gateway must not repeat (see the
    # module doc). UpstreamClient makes every retry itself. No public switch exists;
    # tests/api/test_gateway_replicas.py shows at once if this one stops working.
    session._retry_connection = False
    return session


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
    """Sends requests to a replica of an upstream service, failing over as described above."""

    def __init__(
        self,
        session: ClientSession,
        upstreams: Mapping[Service, ReplicaSet],
        metrics: UpstreamMetrics,
    ) -> None:
        self.session = session
        self._upstreams = upstreams
        self._metrics = metrics

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
        fresh body iterator per attempt; an attempt is only made again if the previous
        one never started its iterator. Raises an ``AppError`` (502/504) when no response
        can be had.
        """
        replicas = self._upstreams[service]
        failure: BaseException | None = None
        attempts = _Attempts(replicas)
        for attempt, replica in attempts:
            if attempt:
                self._metrics.retries.labels(service).inc()
            sent = _TrackedBody(body())
            try:
                response = await self.session.request(
                    method,
                    URL(replica.url + target, encoded=True),
                    headers=headers,
                    data=sent.payload(),
                    allow_redirects=False,
                )
            except (ClientError, TimeoutError) as exc:
                failure = exc
                if not self._try_next(
                    replicas,
                    replica,
                    exc,
                    attempts,
                    idempotent=method in REPLAYABLE_METHODS,
                    body_started=sent.started,
                ):
                    break
            else:
                replicas.mark_up(replica)
                return response
        raise upstream_error(service, failure) from None

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
        replicas = self._upstreams[service]
        failure: BaseException | None = None
        attempts = _Attempts(replicas)
        for attempt, replica in attempts:
            if attempt:
                self._metrics.retries.labels(service).inc()
            try:
                websocket = await self.session.ws_connect(
                    URL(replica.url + target, encoded=True),
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
                replicas.mark_up(replica)  # it answered, if not with a WebSocket
                raise UpstreamRejectedUpgradeError(
                    exc.status, exc.message, exc.headers or {}
                ) from None
            except (ClientError, TimeoutError) as exc:
                failure = exc
                # A handshake is a GET without a body: safe to send again.
                if not self._try_next(
                    replicas, replica, exc, attempts, idempotent=True, body_started=False
                ):
                    break
            else:
                replicas.mark_up(replica)
                return websocket
        raise upstream_error(service, failure) from None

    async def check_ready(self, service: Service) -> None:
        """Returns when at least one replica of ``service`` answers ``/healthz`` with 200."""
        replicas = self._upstreams[service]
        results = await asyncio.gather(
            *(self._check(replicas, replica) for replica in replicas.replicas)
        )
        if not any(results):
            raise NoHealthyReplicaError(f"no replica of {service} is healthy")

    async def check_replicas(self) -> None:
        """One round of health checks: every replica of every service, all at once."""
        await asyncio.gather(
            *(
                self._check(replicas, replica)
                for replicas in self._upstreams.values()
                for replica in replicas.replicas
            )
        )

    async def run_health_checks(self, interval: float) -> None:
        """Checks every replica now and then every ``interval`` seconds, until cancelled."""
        while True:
            await self.check_replicas()
            await asyncio.sleep(interval)

    def _try_next(
        self,
        replicas: ReplicaSet,
        replica: Replica,
        exc: BaseException,
        attempts: _Attempts,
        *,
        idempotent: bool,
        body_started: bool,
    ) -> bool:
        """Counts a failed attempt; whether the request may go to the next replica.

        Never once a body began to be read: what was read cannot be read again.
        """
        if isinstance(exc, _CONNECT_FAILURES):
            kind = "connect_timeout" if isinstance(exc, TimeoutError) else "connect"
            replicas.mark_out(replica, f"{kind}: {exc}")
            retry = not body_started  # always so: a body is read only once connected
        elif isinstance(exc, TimeoutError):  # aiohttp's read timeouts derive from it
            kind, retry = "timeout", False
        elif isinstance(exc, _BROKEN_CONNECTION):
            kind, retry = "disconnect", idempotent and not body_started
            if retry:
                attempts.repeat_if_last(replica)
        else:
            kind, retry = "error", False
        self._metrics.errors.labels(replicas.service, replica.label, kind).inc()
        logger.warning(
            "replica %s of %s failed (%s: %r)%s",
            replica.url,
            replicas.service,
            kind,
            exc,
            "; failing over" if retry else "",
        )
        return retry

    async def _check(self, replicas: ReplicaSet, replica: Replica) -> bool:
        healthy = await self._probe(replica.url)
        result = "ok" if healthy else "failed"
        self._metrics.health_checks.labels(replicas.service, replica.label, result).inc()
        if healthy:
            replicas.mark_up(replica)
        else:
            replicas.mark_out(replica, "/healthz failed")
        return healthy

    async def _probe(self, base_url: str) -> bool:
        try:
            async with self.session.get(
                base_url + "/healthz", timeout=ClientTimeout(total=HEALTH_PROBE_TIMEOUT)
            ) as response:
                return response.status == HTTPStatus.OK
        except (ClientError, TimeoutError):
            return False


class _Attempts:
    """The replicas one request tries in turn: the rotation, and maybe one repeat."""

    __slots__ = ("_queue", "_repeated")

    def __init__(self, replicas: ReplicaSet) -> None:
        self._queue = list(replicas.rotation())
        self._repeated = False

    def __iter__(self) -> Iterator[tuple[int, Replica]]:
        index = 0
        while index < len(self._queue):  # the queue may grow while it is walked
            yield index, self._queue[index]
            index += 1

    def repeat_if_last(self, replica: Replica) -> None:
        """After a broken connection on the last replica, that replica once more.

        A pooled connection the upstream had just closed is the usual cause, and a new
        one will do; with a single replica (a Kubernetes Service URL) there is nowhere
        else to go.
        """
        if not self._repeated and replica is self._queue[-1]:
            self._queue.append(replica)
            self._repeated = True


class _TrackedBody:
    """A request body that remembers whether anyone began to read it."""

    __slots__ = ("_chunks", "started")

    def __init__(self, chunks: AsyncIterable[bytes] | None) -> None:
        self._chunks = chunks
        self.started = False

    def payload(self) -> AsyncIterator[bytes] | None:
        return None if self._chunks is None else self._pull(self._chunks)

    async def _pull(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        # Runs from the first read on: from then on, bytes may have left the client's
        # stream for good, and the request can no longer be sent again.
        self.started = True
        async for chunk in chunks:
            yield chunk
