"""Relaying one HTTP exchange through the gateway, streaming both ways.

Neither body is ever held whole: the request body is handed to the upstream as an async
generator over the client's stream, the response body is copied chunk by chunk as it
arrives, and both directions stop reading when the other side is slow (aiohttp's flow
control), so memory stays flat however large the transfer.
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import ClientError, ClientResponse, web

from gateway.identity import ACCESS_TOKEN_PARAM
from gateway.proxy.client import UpstreamClient
from gateway.proxy.headers import client_response_headers, upstream_request_headers
from gateway.proxy.pacing import BodyPace, paced_body
from gateway.proxy.table import Service
from shared.auth import Identity
from shared.web import SETTINGS

logger = logging.getLogger(__name__)

REQUEST_CHUNK_BYTES: Final = 256 * 1024


def upstream_target(request: web.Request) -> str:
    """Path and query as the client encoded them, after the router's normalisation.

    The router matched the normalised path (dot segments resolved), so that is the one
    forwarded: what was routed is what the upstream sees.
    """
    url = request.rel_url
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
) -> web.StreamResponse:
    """Sends ``request`` to ``service`` and streams the answer back to the client."""
    headers = upstream_request_headers(request, internal_token=internal_token, identity=identity)
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
        return await _relay_response(request, upstream, service)
    finally:
        # A body not read to its end leaves the connection mid-response: close it rather
        # than return it to the pool (a no-op when the body was read to its end).
        if not upstream.content.is_eof():
            upstream.close()
        upstream.release()


async def _relay_response(
    request: web.Request, upstream: ClientResponse, service: Service
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=client_response_headers(upstream.headers),
    )
    try:
        await response.prepare(request)
        while True:
            try:
                chunk = await upstream.content.readany()
            except (ClientError, TimeoutError) as exc:
                # The status line is already out: a problem document now would be
                # appended to a half-sent body. Cutting the connection is the only
                # honest signal left; the client sees a short body and can retry.
                logger.warning(
                    "%s failed mid-body (%r); aborting the client connection", service, exc
                )
                _abort_client(request)
                return response
            if not chunk:
                break
            await response.write(chunk)
        await response.write_eof()
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
