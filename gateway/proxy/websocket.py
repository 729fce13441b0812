"""Bridging a client's WebSocket to an upstream's.

The upstream is connected first, so a refusal (unknown video, rate limit, ...) reaches
the client as an HTTP problem document with the upstream's status instead of an opened
and at once closed socket. Once both are open, text and binary messages are pumped each
way, and a close on either side closes the other with the same code and reason: the
application codes of the live channel (4401, 4404, 4429) must reach the browser.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from http import HTTPStatus
from typing import Final

from aiohttp import ClientWebSocketResponse, WSCloseCode, WSMsgType, hdrs, web

from gateway.proxy.client import (
    WEBSOCKET_HEARTBEAT_SECONDS,
    WEBSOCKET_MAX_MESSAGE_BYTES,
    UpstreamClient,
    UpstreamRejectedUpgradeError,
)
from gateway.proxy.forward import upstream_target
from gateway.proxy.headers import upstream_request_headers
from gateway.proxy.table import Service
from shared.auth import Identity
from shared.errors import BadGatewayError, BadRequestError
from shared.web import problem_response

logger = logging.getLogger(__name__)

AnyWebSocket = web.WebSocketResponse | ClientWebSocketResponse
OpenWebSockets = weakref.WeakSet[web.WebSocketResponse]

# Codes that describe a close but may not be sent in a close frame (RFC 6455 §7.4.1).
_UNSENDABLE_CODES: Final = frozenset({1005, 1006, 1015})
# Passed on from a refused upgrade: what a client needs to act on the refusal.
_REFUSAL_HEADERS: Final = ("Retry-After", "WWW-Authenticate", "Allow")


def is_websocket_upgrade(request: web.Request) -> bool:
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


async def bridge_websocket(
    request: web.Request,
    upstreams: UpstreamClient,
    service: Service,
    *,
    internal_token: str,
    identity: Identity | None,
    open_websockets: OpenWebSockets,
) -> web.StreamResponse:
    if not web.WebSocketResponse().can_prepare(request).ok:
        raise BadRequestError(
            "The request asks for a WebSocket but is not a valid handshake.",
            code="websocket_handshake_invalid",
        )
    requested_protocols = [
        p.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for p in value.split(",")
        if p.strip()
    ]
    headers = upstream_request_headers(
        request, internal_token=internal_token, identity=identity, websocket=True
    )
    try:
        upstream = await upstreams.connect_websocket(
            service, upstream_target(request), headers=headers, protocols=requested_protocols
        )
    except UpstreamRejectedUpgradeError as refusal:
        return _refusal_response(service, refusal)

    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        compress=False,  # permessage-deflate costs ≈ 2.2x CPU per message, for small messages
        max_msg_size=WEBSOCKET_MAX_MESSAGE_BYTES,
        heartbeat=WEBSOCKET_HEARTBEAT_SECONDS,
        autoclose=False,
    )
    try:
        await client.prepare(request)
    except BaseException:
        await upstream.close(code=WSCloseCode.GOING_AWAY)
        raise
    open_websockets.add(client)
    try:
        await _pump_until_closed(client, upstream)
    finally:
        open_websockets.discard(client)
        await upstream.close(code=WSCloseCode.GOING_AWAY)  # no-op when already closed
    return client


def _refusal_response(service: Service, refusal: UpstreamRejectedUpgradeError) -> web.Response:
    if refusal.status < HTTPStatus.BAD_REQUEST:
        # A 2xx/3xx to an upgrade request means the upstream did not speak WebSocket there.
        logger.warning("%s answered a WebSocket upgrade with %s", service, refusal)
        error = BadGatewayError(
            f"The {service} service did not accept the WebSocket.",
            code="upstream_bad_handshake",
        )
        return problem_response(
            status=error.status, code=error.instance_code, title=error.title, detail=error.detail
        )
    try:
        title = HTTPStatus(refusal.status).phrase
    except ValueError:
        title = "Refused"
    return problem_response(
        status=refusal.status,
        code="websocket_refused",
        title=title,
        detail=f"The {service} service refused the WebSocket: {refusal.message}.",
        headers={k: refusal.headers[k] for k in _REFUSAL_HEADERS if k in refusal.headers},
    )


async def _pump_until_closed(
    client: web.WebSocketResponse, upstream: ClientWebSocketResponse
) -> None:
    """Pumps both ways until one side ends, then closes the other to match."""
    to_client = asyncio.create_task(_relay(upstream, client), name="ws-upstream-to-client")
    to_upstream = asyncio.create_task(_relay(client, upstream), name="ws-client-to-upstream")
    try:
        done, _pending = await asyncio.wait(
            {to_client, to_upstream}, return_when=asyncio.FIRST_COMPLETED
        )
        if to_client in done:
            # No close frame from the upstream means it vanished: say so as a gateway would.
            code, reason = _close_to_pass_on(to_client, default=WSCloseCode.BAD_GATEWAY)
        else:
            # The client vanished, or the gateway is shutting down: the viewer has gone.
            code, reason = _close_to_pass_on(to_upstream, default=WSCloseCode.GOING_AWAY)
        # Each close either answers that side's close frame or passes the other's on, and
        # ends the relay still reading it. The client's comes last: closing its transport
        # cancels this handler (the gateway runs with handler_cancellation).
        await upstream.close(code=code, message=reason)
        await client.close(code=code, message=reason)
    finally:
        # Both relays have normally ended by now; awaiting nothing more then lets the
        # handler return before the client's closed transport cancels it.
        unfinished = [task for task in (to_client, to_upstream) if not task.done()]
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished)


def _close_to_pass_on(
    relay: asyncio.Task[tuple[int, str] | None], *, default: int
) -> tuple[int, bytes]:
    if (error := relay.exception()) is not None:
        logger.warning("WebSocket relay failed: %r", error)
        return default, b""
    peer_close = relay.result()
    if peer_close is None:
        return default, b""
    code, reason = peer_close
    return code, reason.encode()


async def _relay(source: AnyWebSocket, sink: AnyWebSocket) -> tuple[int, str] | None:
    """Copies data messages from ``source`` to ``sink`` until ``source`` ends.

    Returns the close code and reason ``source``'s peer sent, or None when the
    connection ended without a close frame.
    """
    while True:
        message = await source.receive()
        if message.type is WSMsgType.TEXT or message.type is WSMsgType.BINARY:
            try:
                if message.type is WSMsgType.TEXT:
                    await sink.send_str(message.data)
                else:
                    await sink.send_bytes(message.data)
            except ConnectionResetError:
                # The sink is closing: the relay reading it reports how, and the bridge
                # then closes this source. Until then the message has nowhere to go.
                continue
        elif message.type is WSMsgType.CLOSE:
            code = source.close_code
            if code is None or code in _UNSENDABLE_CODES:
                code = WSCloseCode.OK  # a close frame without a code is a normal close
            return code, message.extra or ""  # the bridge answers the close frame
        elif message.type in (WSMsgType.PING, WSMsgType.PONG):
            continue  # answered by autoping
        else:
            # CLOSING (the bridge closed this side), CLOSED or ERROR: no frame to relay.
            return None
