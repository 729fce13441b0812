"""CORS for every ``/api/v1`` route, answered by the gateway alone.

Front ends on other origins call the gateway directly (DESIGN "Public HTTP API"), so the
gateway is the one place that speaks CORS; whatever ``Access-Control-*`` header an
upstream sends is dropped on the way (``gateway.proxy.headers``) and replaced by the
gateway's policy.

- ``VOD_CORS_ORIGINS`` lists the allowed origins (``*`` allows any). An empty list (the
  default) turns CORS off: no CORS header on any response, and every preflight is refused.
- A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) never
  reaches an upstream: an allowed origin gets ``204`` with the methods and request headers
  below, any other origin a ``403`` problem document ``cors_origin_not_allowed``.
- Every other ``/api/v1`` response (proxied, the gateway's own, problem documents alike)
  gets ``Access-Control-Allow-Origin`` and ``Access-Control-Expose-Headers`` when its
  ``Origin`` is allowed, and ``Vary: Origin`` whenever CORS is on, because whether those
  headers are present depends on the request's origin (streams are ``public`` and cached).
- No ``Access-Control-Allow-Credentials``: the API authenticates with Bearer tokens; its
  only cookies are the web page's own session cookies (``api_service.session_cookies``),
  for the page's origin alone. Credentialed cross-origin requests are neither needed nor
  allowed: a page on another origin never gets to read an answer a cookie obtained.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from gateway.proxy.table import API_PREFIX
from shared.errors import ForbiddenError

WILDCARD: Final = "*"

ALLOWED_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

# What a browser front end sends beyond the CORS-safelisted headers: the token, ranges and
# their validators, the upload checksum, a request id to correlate, and tus 1.0's headers.
ALLOWED_REQUEST_HEADERS: Final = (
    "Authorization",
    "Content-Type",
    "Range",
    "If-Range",
    "If-None-Match",
    "If-Modified-Since",
    "X-Chunk-SHA256",
    "X-Request-ID",
    "Tus-Resumable",
    "Upload-Length",
    "Upload-Offset",
    "Upload-Metadata",
    "Upload-Checksum",
    "Upload-Defer-Length",
    "Upload-Concat",
    "X-HTTP-Method-Override",
)

# Response headers a script may read, beyond the safelisted ones (Content-Type,
# Last-Modified, Cache-Control, ...). Rate-limit headers in both the IETF draft's and the
# common X- spelling, so a front end can back off whichever the gateway sends.
EXPOSED_RESPONSE_HEADERS: Final = (
    "Content-Range",
    "Content-Length",
    "Accept-Ranges",
    "ETag",
    "X-Request-ID",
    "Retry-After",
    "Location",
    "Allow",
    "RateLimit",
    "RateLimit-Policy",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Tus-Resumable",
    "Tus-Version",
    "Tus-Extension",
    "Tus-Max-Size",
    "Tus-Checksum-Algorithm",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Expires",
    "Upload-Metadata",
)

# How long a browser may reuse a preflight's answer (Chromium caps it at 2 h anyway).
PREFLIGHT_MAX_AGE_SECONDS: Final = 600

_ALLOW_METHODS_VALUE: Final = ", ".join(ALLOWED_METHODS)
_ALLOW_HEADERS_VALUE: Final = ", ".join(ALLOWED_REQUEST_HEADERS)
_EXPOSE_HEADERS_VALUE: Final = ", ".join(EXPOSED_RESPONSE_HEADERS)


class CorsPolicy:
    """Which origins may call the API from a browser, and the headers that say so."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.enabled = bool(origins)
        self._any = WILDCARD in origins
        self._origins = frozenset(origins)

    def allows(self, origin: str) -> bool:
        return self._any or origin in self._origins

    def middleware(self) -> Middleware:
        """Answers preflights itself; every other request goes on to its handler."""

        @web.middleware
        async def cors_preflight_middleware(
            request: web.Request, handler: Handler
        ) -> web.StreamResponse:
            if not _is_preflight(request) or not _under_api(request):
                return await handler(request)
            origin = request.headers[hdrs.ORIGIN]
            if not self.allows(origin):
                raise ForbiddenError(
                    f"Origin {origin!r} may not call this API from a browser.",
                    code="cors_origin_not_allowed",
                )
            return web.Response(
                status=204,
                headers={
                    hdrs.ACCESS_CONTROL_ALLOW_METHODS: _ALLOW_METHODS_VALUE,
                    hdrs.ACCESS_CONTROL_ALLOW_HEADERS: _ALLOW_HEADERS_VALUE,
                    hdrs.ACCESS_CONTROL_MAX_AGE: str(PREFLIGHT_MAX_AGE_SECONDS),
                },
            )

        return cors_preflight_middleware

    def response_signal(self) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
        """An ``on_response_prepare`` hook: the headers go on every response as it starts,
        streamed and proxied ones included (their headers leave before any middleware
        could see them)."""

        async def stamp_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
            if not _under_api(request) or response.status == 101:  # noqa: PLR2004 - upgrades
                return
            preflight = _is_preflight(request)
            _add_vary(response, hdrs.ORIGIN)
            origin = request.headers.get(hdrs.ORIGIN)
            if origin is None or not self.allows(origin):
                return
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = WILDCARD if self._any else origin
            if preflight:
                _add_vary(response, hdrs.ACCESS_CONTROL_REQUEST_METHOD)
                _add_vary(response, hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
            else:
                response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _EXPOSE_HEADERS_VALUE

        return stamp_cors_headers


def install(app: web.Application, origins: tuple[str, ...]) -> None:
    """Adds the policy for ``origins`` to ``app`` (before it is frozen).

    The middleware goes last, inside the error middleware, so a refused preflight is a
    problem document and is counted and logged like any request.
    """
    policy = CorsPolicy(origins)
    app.middlewares.append(policy.middleware())
    if policy.enabled:
        # Off, no response gets a CORS header: nothing to stamp (an upstream's own are
        # dropped by the proxy whether CORS is on or off).
        app.on_response_prepare.append(policy.response_signal())


def _is_preflight(request: web.Request) -> bool:
    return (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ORIGIN in request.headers
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )


def _under_api(request: web.Request) -> bool:
    path = request.path
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")


def _add_vary(response: web.StreamResponse, name: str) -> None:
    present = {
        token.strip().lower()
        for value in response.headers.getall(hdrs.VARY, ())
        for token in value.split(",")
    }
    if "*" in present or name.lower() in present:
        return
    response.headers.add(hdrs.VARY, name)
