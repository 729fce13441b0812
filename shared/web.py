"""What every vod HTTP app shares: its middleware, problem documents, health and metrics.

One middleware (``service_middleware``) does, outermost first (the order matters):

1. **lifecycle**: counts the requests in flight, which a shutdown waits for, and closes
   each connection after its response while the process is draining;
2. **request id**: takes or makes the request id; every log line and every response
   carries it;
3. **observe**: times the request, counts it by route and status, logs it;
4. **errors**: the one place that turns exceptions into RFC 9457 problem documents; an
   unexpected exception is logged once and answered as a bare 500;
5. **internal token** (upstream services only): refuses any request that did not come
   through the gateway, except health and metrics.

One coroutine rather than five middlewares: every layer is a frame that each resumption
of the handler passes through (several per proxied request), ≈ 1-2 µs apiece, and on the
gateway's hot path that was a measurable share of a cached read (docs/performance.md,
the third pass). Middlewares an app adds itself (the gateway's CORS) run inside it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shared.auth import Identity
from shared.db.errors import DatabaseUnavailableError
from shared.errors import (
    AppError,
    BadRequestError,
    ForbiddenError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from shared.logging import request_id_var
from shared.settings import Settings

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
INTERNAL_TOKEN_HEADER = "X-Internal-Token"  # noqa: S105 - a header name
PROBLEM_CONTENT_TYPE = "application/problem+json"
# Paths answered without the internal token: probes and scrapers do not hold it.
UNGUARDED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

ReadinessCheck = Callable[[], Awaitable[None]]
CleanupContext = Callable[[web.Application], AsyncIterator[None]]

SETTINGS = web.AppKey("settings", Settings)
SERVICE_NAME = web.AppKey("service_name", str)
READINESS_CHECKS = web.AppKey("readiness_checks", dict[str, ReadinessCheck])
REQUEST_ID = web.RequestKey("request_id", str)
# The level of an app's one line per request (INFO unless set): standalone sets DEBUG on
# the upstreams, whose every request is one the gateway in the same process logs already.
REQUEST_LOG_LEVEL = web.AppKey("request_log_level", int)


class HttpMetrics:
    """Prometheus metrics of one app, in a registry of its own.

    A registry per app (not the global one) because standalone mode runs four apps in one
    process, and each must expose only its own series.
    """

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vod_http_requests_total",
            "HTTP requests by route, method and status",
            ["service", "route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vod_http_request_duration_seconds",
            "Time to the end of the handler, by route and method",
            ["service", "route", "method"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.in_flight = Gauge(
            "vod_http_requests_in_flight",
            "Requests being handled now",
            ["service"],
            registry=self.registry,
        )
        self.service = service
        # Labelled children, looked up once per label set rather than on every request
        # (``labels()`` validates and hashes its arguments under a lock each time). The
        # key sets are those the registry holds anyway: route templates, methods, statuses.
        self.in_flight_now = self.in_flight.labels(service)
        self._request_counts: dict[tuple[str, str, int], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Counts one finished request and records how long it took."""
        count = self._request_counts.get((route, method, status))
        if count is None:
            count = self.requests.labels(self.service, route, method, str(status))
            self._request_counts[route, method, status] = count
        count.inc()
        latency = self._latencies.get((route, method))
        if latency is None:
            latency = self.latency.labels(self.service, route, method)
            self._latencies[route, method] = latency
        latency.observe(seconds)


METRICS = web.AppKey("metrics", HttpMetrics)
# Options for the HTTP server that runs an app (``aiohttp.web.Server`` / ``RequestHandler``
# keyword arguments): the gateway sets its slow-client bounds here; every launcher
# (``shared.runner``, ``standalone``, the tests) passes them on via ``server_options``.
SERVER_OPTIONS = web.AppKey("server_options", dict[str, Any])


def server_options(app: web.Application) -> dict[str, Any]:
    """Keyword arguments for the ``AppRunner`` / ``run_app`` / ``TestServer`` serving ``app``."""
    if SERVER_OPTIONS not in app:
        return {}
    options: dict[str, Any] = app[SERVER_OPTIONS]
    return dict(options)


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response serialised with orjson (datetimes become RFC 3339)."""
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def problem_response(
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An RFC 9457 problem document. ``type`` is a stable URN built from ``code``."""
    body: dict[str, Any] = {
        "type": f"urn:vod:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    request_id = request_id_var.get()
    if request_id is not None:
        body["request_id"] = request_id
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
    response = web.Response(body=orjson.dumps(body), status=status, headers=headers)
    response.content_type = PROBLEM_CONTENT_TYPE
    return response


def app_error_response(error: AppError) -> web.Response:
    return problem_response(
        status=error.status,
        code=error.instance_code,
        title=error.title,
        detail=error.detail,
        extra=error.extra,
        headers=error.headers,
    )


def route_label(request: web.Request) -> str:
    """The route template ("/api/v1/videos/{id}"), never the raw path: bounded cardinality."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    return resource.canonical


class _RequestIds:
    """Request ids made here: 32 hex digits, a random half per process and a counter.

    As unique as ``uuid4().hex`` in practice (64 random bits tell processes apart, the
    counter tells requests apart) without a ``getrandom`` system call per request. Ids
    are for correlating logs, not secrets: that they are sequential does no harm.
    """

    def __init__(self) -> None:
        self._reseed()
        # A forked child must not repeat its parent's ids.
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(secrets.randbits(32))

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


_request_ids = _RequestIds()


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # A signal rather than the middleware: streamed responses send their headers from
    # inside the handler, before any middleware sees the response.
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


class Lifecycle:
    """Whether the process is draining (SIGTERM received, on its way out) and how many
    HTTP requests it is handling, which its shutdown waits for (shared.runner; which
    connections are idle it learns from aiohttp's own state)."""

    def __init__(self) -> None:
        self.draining = False
        self.requests = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def request_started(self, *, counted: bool) -> None:
        if counted:
            self.requests += 1
            self._idle.clear()

    def request_finished(self, *, counted: bool) -> None:
        if counted:
            self.requests -= 1
            if self.requests == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no counted request is in flight."""
        await self._idle.wait()


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
# A public app's operators' listener (``create_base_app(public=True)``): served by every
# launcher on ``settings.metrics_host``:``metrics_port``, never on the public port.
OPERATOR_APP = web.AppKey("operator_app", web.Application)


_HTTP_CODES = {
    400: "bad_request",
    404: "route_not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def service_middleware(internal_token: str | None) -> Middleware:
    """The middleware of every vod app (the module's docstring); ``internal_token``: the
    shared secret every request but health and metrics must carry (None: not checked)."""
    expected = internal_token.encode() if internal_token is not None else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        app = request.app
        lifecycle = app[LIFECYCLE]
        # WebSockets are not counted: they end only when closed, which each app's
        # on_shutdown does once the door is closed.
        counted = request.headers.get("Upgrade", "").lower() != "websocket"
        lifecycle.request_started(counted=counted)
        incoming = request.headers.get(REQUEST_ID_HEADER)
        if incoming is not None and _REQUEST_ID_RE.match(incoming):
            request_id = incoming
        else:
            request_id = _request_ids.next()
        request[REQUEST_ID] = request_id
        context = request_id_var.set(request_id)
        metrics = app[METRICS]
        started = time.perf_counter()
        status = 500
        metrics.in_flight_now.inc()
        try:
            try:
                if expected is not None and request.path not in UNGUARDED_PATHS:
                    _check_internal_token(request, expected)
                response = await handler(request)
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception as error:  # noqa: BLE001 - every kind is answered below
                response = _problem_for(request, error)
            status = response.status
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's convention)
            raise
        finally:
            _observe(request, metrics, status, time.perf_counter() - started)
            request_id_var.reset(context)
            lifecycle.request_finished(counted=counted)
        if lifecycle.draining:
            # While draining, every response closes its connection, so a keep-alive
            # client (the gateway's pool) opens a new one, which lands on another
            # replica once this one's door is closed.
            response.force_close()
        return response

    return middleware


def _check_internal_token(request: web.Request, expected: bytes) -> None:
    presented = request.headers.get(INTERNAL_TOKEN_HEADER, "").encode()
    if not hmac.compare_digest(presented, expected):
        raise ForbiddenError(
            "This service only answers requests that come through the gateway.",
            code="internal_token_required",
        )


def _observe(request: web.Request, metrics: HttpMetrics, status: int, elapsed: float) -> None:
    route = route_label(request)
    metrics.in_flight_now.dec()
    metrics.observe(route, request.method, status, elapsed)
    app = request.app
    level = app.get(REQUEST_LOG_LEVEL, logging.INFO)
    # The check first: the log line's arguments are not built when its level is off.
    if logger.isEnabledFor(level) and request.path not in UNGUARDED_PATHS:
        logger.log(
            level,
            "%s %s %s",
            request.method,
            request.path,
            status,
            extra={
                # Which app: standalone runs four in one process.
                "service": app[SERVICE_NAME],
                "route": route,
                "status": status,
                "ms": round(elapsed * 1000, 2),
            },
        )


def _problem_for(request: web.Request, error: Exception) -> web.StreamResponse:
    """The answer to a handler's ``error``: a problem document (or the redirect or
    success an ``HTTPException`` stands for, re-raised for aiohttp to send)."""
    if isinstance(error, AppError):
        return app_error_response(error)
    if isinstance(error, DatabaseUnavailableError):
        # The database port raises a plain exception (it knows nothing of HTTP): an
        # outage is a 503 the client may retry, not an internal error.
        logger.warning("database unavailable in %s %s: %s", request.method, request.path, error)
        return app_error_response(unavailable("database"))
    if isinstance(error, web.HTTPException):
        if error.status < 400:  # noqa: PLR2004 - redirects and successes pass through
            raise error
        headers = {k: v for k, v in error.headers.items() if k.lower() in ("allow", "retry-after")}
        detail = (
            error.text
            if error.text and not error.text.startswith(str(error.status))
            else error.reason
        )
        if error.status == 404:  # noqa: PLR2004
            detail = f"No route for {request.method} {request.path}"
        return problem_response(
            status=error.status,
            code=_HTTP_CODES.get(error.status, f"http_{error.status}"),
            title=error.reason,
            detail=detail,
            headers=headers,
        )
    # Logged once here, with the request id; the client learns nothing of the inside.
    logger.error("unhandled error in %s %s", request.method, request.path, exc_info=error)
    return problem_response(
        status=500,
        code="internal_error",
        title="Internal Server Error",
        detail="An unexpected error occurred; quote the request id when reporting it.",
    )


def _draining_response() -> web.Response:
    return json_response({"status": "draining"}, status=503)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Never touches a back end.

    503 while draining: the gateway's replica check reads this, and must stop choosing a
    replica that is about to close its door.
    """
    if request.app[LIFECYCLE].draining:
        return _draining_response()
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness in detail: every back end this service needs answers within a short
    deadline, each one's result in ``checks``. Served where clients cannot ask: an
    upstream's internal port, or a public app's operators' listener."""
    if request.app[LIFECYCLE].draining:
        return _draining_response()
    report = await _readiness_report(request.app[READINESS_CHECKS])
    ready = all(value == "ok" for value in report.values())
    return json_response(
        {"status": "ready" if ready else "unavailable", "checks": report},
        status=200 if ready else 503,
    )


async def public_readyz(request: web.Request) -> web.Response:
    """Readiness for anyone who can reach the public port: ready or not, nothing more.

    Which back end is down, and how it failed, is a map of the inside for an attacker
    (docs/security.md); operators read it on their own listener's ``/readyz``.
    """
    ready = not request.app[LIFECYCLE].draining and all(
        value == "ok" for value in (await _readiness_report(request.app[READINESS_CHECKS])).values()
    )
    if ready:
        return json_response({"status": "ready"})
    return json_response({"status": "not ready"}, status=503)


async def _readiness_report(checks: dict[str, ReadinessCheck]) -> dict[str, str]:
    results = await asyncio.gather(*(_run_check(check) for check in checks.values()))
    return dict(zip(checks.keys(), results, strict=True))


READINESS_TIMEOUT = 2.0


async def _run_check(check: ReadinessCheck) -> str:
    try:
        async with asyncio.timeout(READINESS_TIMEOUT):
            await check()
    except TimeoutError:
        return "timeout"
    except Exception as exc:  # noqa: BLE001 - a readiness probe reports, it does not raise
        return f"error: {type(exc).__name__}"
    return "ok"


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def create_base_app(
    service: str,
    settings: Settings,
    *,
    require_internal_token: bool = True,
    client_max_size: int | None = None,
    public: bool = False,
) -> web.Application:
    """An application with vod's middlewares, ``/healthz``, ``/readyz`` and ``/metrics``.

    Each service's ``create_app`` starts here, adds its routes, its ``cleanup_ctx`` and
    its readiness checks (``app[READINESS_CHECKS]["db"] = ...``).

    ``public``: the app faces clients (the gateway). Its own port then answers only
    ``/healthz`` and a ``/readyz`` that says ready or not; ``/metrics`` and the detailed
    ``/readyz`` are on ``app[OPERATOR_APP]``, which the launcher serves on the operators'
    listener (``VOD_METRICS_HOST``:``VOD_METRICS_PORT``).
    """
    token = settings.internal_token if require_internal_token else None
    app = web.Application(
        middlewares=[service_middleware(token)],
        client_max_size=client_max_size or settings.max_json_bytes,
    )
    app[SETTINGS] = settings
    app[SERVICE_NAME] = service
    app[METRICS] = HttpMetrics(service)
    app[READINESS_CHECKS] = {}
    app[LIFECYCLE] = Lifecycle()
    app.on_response_prepare.append(_stamp_request_id)
    app.router.add_get("/healthz", healthz, name="healthz")
    if public:
        app.router.add_get("/readyz", public_readyz, name="readyz")
        app[OPERATOR_APP] = _create_operator_app(app)
    else:
        _add_operator_routes(app)
    return app


def _create_operator_app(public_app: web.Application) -> web.Application:
    """The operators' side of ``public_app``: the same metrics registry and readiness
    checks (the very dict, so checks added later count), a lifecycle of its own."""
    app = web.Application(middlewares=[service_middleware(None)])
    app[SETTINGS] = public_app[SETTINGS]
    app[SERVICE_NAME] = public_app[SERVICE_NAME]
    app[METRICS] = public_app[METRICS]
    app[READINESS_CHECKS] = public_app[READINESS_CHECKS]
    app[LIFECYCLE] = Lifecycle()
    app.on_response_prepare.append(_stamp_request_id)
    app.router.add_get("/healthz", healthz, name="healthz")
    _add_operator_routes(app)
    return app


def _add_operator_routes(app: web.Application) -> None:
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics_handler, name="metrics")


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or a 400/413/415 problem; never a 500."""
    if request.content_type != "application/json":
        raise UnsupportedMediaTypeError(
            "Send the body as application/json.", code="unsupported_media_type"
        )
    limit = request.app[SETTINGS].max_json_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(f"JSON bodies are limited to {limit} bytes.")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLargeError(f"JSON bodies are limited to {limit} bytes.") from None
    if len(raw) > limit:
        raise PayloadTooLargeError(f"JSON bodies are limited to {limit} bytes.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"The body is not valid JSON: {exc}", code="malformed_json") from None


def request_identity(request: web.Request) -> Identity | None:
    """The caller the gateway verified, or None when anonymous.

    Only meaningful behind ``service_middleware``'s internal-token check: the headers are
    trusted because nobody but the gateway can reach this service with the internal token.
    """
    return Identity.from_headers(request.headers)


def require_identity(request: web.Request) -> Identity:
    """The verified caller; 401 problem for an anonymous request."""
    identity = Identity.from_headers(request.headers)
    if identity is None:
        raise UnauthorizedError("Sign in first: send an access token.", code="unauthorized")
    return identity


def unavailable(backend: str) -> ServiceUnavailableError:
    """The 503 raised when ``backend`` cannot be reached; clients may retry later."""
    error = ServiceUnavailableError(
        f"The {backend} is unavailable; try again shortly.", code=f"{backend}_unavailable"
    )
    error.headers["Retry-After"] = "2"
    return error
