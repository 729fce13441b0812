"""Relaying one HTTP exchange through the gateway, streaming both ways.

Neither body is ever held whole beyond ``SMALL_BODY_BYTES``: the request body is handed
to the upstream as an async generator over the client's stream, the response body is
copied chunk by chunk as it arrives, and both directions stop reading when the other side
is slow (aiohttp's flow control), so memory stays flat however large the transfer.

A small response of known length (the JSON of most API calls) is the exception: it is
read whole and sent with its headers in one write. Streamed, its headers and its body
would leave in two ``send`` calls, and a socket write costs ≈ 35 µs of CPU on the hosts
measured, a tenth of a proxied metadata read.
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import ClientError, ClientResponse, web
from multidict import CIMultiDict

from gateway.identity import ACCESS_TOKEN_PARAM
from gateway.proxy.client import UpstreamClient, upstream_error
from gateway.proxy.headers import client_response_headers, upstream_request_headers
from gateway.proxy.pacing import BodyPace, paced_body
from gateway.proxy.table import Service
from shared.auth import Identity
from shared.stall import StreamStalledError, stall_guard
from shared.web import SETTINGS

logger = logging.getLogger(__name__)

REQUEST_CHUNK_BYTES: Final = 256 * 1024
# Responses up to this size (by their Content-Length) are read whole, then sent at once.
SMALL_BODY_BYTES: Final = 64 * 1024
# No body follows these, whatever Content-Length says (RFC 9110 §6.4.1).
_BODILESS_STATUSES: Final = frozenset({204, 304})


def upstream_target(request: web.Request) -> str:
    """Path and query as the client encoded them, after the router's normalisation.

    The router matched the normalised path (dot segments resolved), so that is the one
    forwarded: what was routed is what the upstream sees.
    """
    url = request.rel_url
    if not url.raw_query_string:
        return url.raw_path
    if ACCESS_TOKEN_PARAM in url.query:
        # The token was verified here; upstreams get the identity, never the token.
        url = url.without_query_params(ACCESS_TOKEN_PARAM)
    query = url.raw_query_string
    return url.raw_path + ("?" + query if query else "")


async def forward_http(
    request: web.Request,
    upstreams: UpstreamClient,
    service: Service,
    *,
    internal_token: str,
    identity: Identity | None,
    cookies: bool = False,
) -> web.StreamResponse:
    """Sends ``request`` to ``service`` and streams the answer back to the client; cookies
    cross in either direction only if ``cookies``."""
    headers = upstream_request_headers(
        request, internal_token=internal_token, identity=identity, cookies=cookies
    )
    has_body = request.body_exists
    settings = request.app[SETTINGS]
    # A client that sends its body too slowly is dropped (gateway.proxy.pacing).
    pace = BodyPace(settings.client_body_timeout, settings.client_min_body_rate)
    upstream = await upstreams.request(
        service,
        request.method,
        upstream_target(request),
        headers=headers,
        body=lambda: paced_body(request, pace, REQUEST_CHUNK_BYTES) if has_body else None,
    )
    try:
        response_headers = client_response_headers(upstream.headers, cookies=cookies)
        if _small_body(request, upstream):
            return await _whole_response(upstream, service, response_headers)
        return await _relay_response(request, upstream, service, response_headers)
    finally:
        # A body not read to its end leaves the connection mid-response: close it rather
        # than return it to the pool (a no-op when the body was read to its end).
        if not upstream.content.is_eof():
            upstream.close()
        upstream.release()


def _small_body(request: web.Request, upstream: ClientResponse) -> bool:
    """Whether the answer is a body of known, small length (never HEAD's, 1xx, 204, 304)."""
    length = upstream.content_length
    return (
        length is not None
        and length <= SMALL_BODY_BYTES
        and request.method != "HEAD"
        and upstream.status >= 200  # noqa: PLR2004 - informational answers have no body
        and upstream.status not in _BODILESS_STATUSES
    )


async def _whole_response(
    upstream: ClientResponse, service: Service, headers: CIMultiDict[str]
) -> web.Response:
    """The upstream's small answer as one response: headers and body leave in one write."""
    try:
        body = await upstream.content.read()  # to the end: the caller then releases
    except (ClientError, TimeoutError) as exc:
        # Nothing has reached the client yet: it gets an honest 502/504, not a torn body.
        logger.warning("%s failed mid-body (%r) before the answer was relayed", service, exc)
        raise upstream_error(service, exc) from None
    return web.Response(
        status=upstream.status,
        reason=upstream.reason,
        headers=headers,
        body=body,
    )


class RelayedResponse(web.StreamResponse):
    """Headers held at ``prepare`` and sent with the first piece of the body, in one
    ``send``: a segment of headers alone costs the client one more wake-up."""

    # aiohttp's own switch (its ``web.Response`` holds headers for its body the same way).
    _send_headers_immediately = False


async def _relay_response(
    request: web.Request, upstream: ClientResponse, service: Service, headers: CIMultiDict[str]
) -> web.StreamResponse:
    response = RelayedResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    # A client that stops reading is dropped after the stall period (shared.stall), and
    # the caller then closes the upstream connection its download held.
    stall_seconds = request.app[SETTINGS].stream_stall_seconds
    try:
        await response.prepare(request)
        async with stall_guard(request.transport, stall_seconds) as guard:
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (ClientError, TimeoutError) as exc:
                    # The response has started (its headers leave with the first piece,
                    # so they may still be held, but aiohttp has prepared it): a problem
                    # document now could follow part of a body. Cutting the connection
                    # is the only honest signal left; the client sees a short or no
                    # answer and can retry.
                    logger.warning(
                        "%s failed mid-body (%r); aborting the client connection", service, exc
                    )
                    _abort_client(request)
                    return response
                if not chunk:
                    break
                await guard.write(response.write(chunk))
            await guard.write(response.write_eof())
    except StreamStalledError:
        logger.info("client took no bytes for %g s; dropped", stall_seconds)
    except ConnectionResetError:
        # The client went away; the caller closes the upstream connection.
        logger.info("client disconnected before the end of the response")
    return response


def _abort_client(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        # abort() drops the unsent buffer, close() would flush it then finish cleanly;
        # either way no terminating chunk is written, so the truncation is visible.
        transport.abort()
