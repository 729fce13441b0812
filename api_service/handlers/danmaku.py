"""Danmaku over HTTP, and the live WebSocket of a video.

The live channel (``GET /api/v1/videos/{video_id}/live``), after the upgrade:

- server -> client: ``{"type":"danmaku", ...}`` for each new danmaku of the video (from
  any replica) and ``{"type":"viewers","count":N}`` every ``VOD_LIVE_VIEWER_INTERVAL``;
- client -> server: ``{"type":"danmaku", offset_ms, content, mode, color}``, answered
  ``{"type":"sent","id":...}`` (the danmaku itself arrives like everyone else's);
  a bad message is answered ``{"type":"error","code":...}`` and the socket stays open.

Close codes: 4404 unknown video (the upgrade is accepted first, so a browser can read
the code), 4401 a send without signing in, or the socket's token signed out or expired
(``api_service.live.token_watch``), 4429 a sender over the danmaku rate limit or
a client sending more than ``MAX_MESSAGES_PER_SECOND`` frames, 1011 a back end failing.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import orjson
from aiohttp import WSMsgType, web

from api_service.keys import DANMAKU, LIVE_HUB, TOKEN_WATCH
from api_service.schemas import parse_danmaku_window, parse_new_danmaku
from api_service.services.danmaku import DanmakuService
from shared.auth import Identity
from shared.errors import (
    AppError,
    NotFoundError,
    RateLimitedError,
    ServiceUnavailableError,
    ValidationError,
)
from shared.web import json_response, read_json, request_identity, require_identity

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED: Final = 4401
CLOSE_NOT_FOUND: Final = 4404
CLOSE_RATE_LIMITED: Final = 4429
CLOSE_INTERNAL: Final = 1011
CLOSE_GOING_AWAY: Final = 1001
CLOSE_UNSUPPORTED: Final = 1003
# Frames of any kind one client may send per second before it is closed as a flooder.
MAX_MESSAGES_PER_SECOND: Final = 20
MAX_MESSAGE_BYTES: Final = 4096
HEARTBEAT_SECONDS: Final = 30.0


async def list_danmaku(request: web.Request) -> web.Response:
    window = parse_danmaku_window(request.query)
    items = await request.app[DANMAKU].window(
        request.match_info["video_id"], window.from_ms, window.to_ms
    )
    return json_response({"items": items})


async def create_danmaku(request: web.Request) -> web.Response:
    identity = require_identity(request)
    new = parse_new_danmaku(await read_json(request))
    item = await request.app[DANMAKU].create(identity, request.match_info["video_id"], new)
    return json_response(item, status=201)


async def watch_live(request: web.Request) -> web.StreamResponse:
    video_id = request.match_info["video_id"]
    service = request.app[DANMAKU]
    hub = request.app[LIVE_HUB]
    ws = web.WebSocketResponse(
        compress=False,  # permessage-deflate ≈ 2.2x CPU per delivery, for a few dozen bytes
        heartbeat=HEARTBEAT_SECONDS,
        max_msg_size=MAX_MESSAGE_BYTES,
    )
    # Refusals are close codes after the handshake: a browser cannot read the status of
    # a refused WebSocket handshake.
    try:
        await service.require_video(video_id)
    except NotFoundError as error:
        await ws.prepare(request)
        await ws.close(code=CLOSE_NOT_FOUND, message=error.detail.encode()[:120])
        return ws
    except ServiceUnavailableError:
        await ws.prepare(request)
        await ws.close(code=CLOSE_INTERNAL, message=b"back end unavailable")
        return ws
    # Joined before the handshake answers: a danmaku published once the client sees its
    # socket open is queued for it, not missed.
    viewer = hub.join(
        video_id,
        ws.send_str,
        lambda: ws.close(code=CLOSE_GOING_AWAY, message=b"shutting down"),
        start=False,
    )
    identity = request_identity(request)

    async def close(code: int, reason: str) -> None:
        await ws.close(code=code, message=reason.encode()[:120])

    try:
        await ws.prepare(request)
        viewer.start()
        # The socket ends with its token: sign-out anywhere, or expiry, closes it (4401).
        async with request.app[TOKEN_WATCH].guard(identity, close):
            await _read_until_closed(ws, service, video_id, identity)
    finally:
        await hub.leave(viewer)
    return ws


async def _read_until_closed(
    ws: web.WebSocketResponse,
    service: DanmakuService,
    video_id: str,
    identity: Identity | None,
) -> None:
    window_started = time.monotonic()
    in_window = 0
    async for message in ws:
        now = time.monotonic()
        if now - window_started >= 1.0:
            window_started, in_window = now, 0
        in_window += 1
        if in_window > MAX_MESSAGES_PER_SECOND:
            await ws.close(code=CLOSE_RATE_LIMITED, message=b"too many messages")
            return
        if message.type is not WSMsgType.TEXT:
            await ws.close(code=CLOSE_UNSUPPORTED, message=b"text frames only")
            return
        close = await _handle(ws, service, video_id, identity, message.data)
        if close is not None:
            await ws.close(code=close[0], message=close[1].encode()[:120])
            return


async def _handle(  # noqa: PLR0911 - one return per way a frame can end
    ws: web.WebSocketResponse,
    service: DanmakuService,
    video_id: str,
    identity: Identity | None,
    text: str,
) -> tuple[int, str] | None:
    """Handle one client frame; returns the close (code, reason) when it ends the socket."""
    try:
        body: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        await _send_error(ws, "malformed_json", "Messages are JSON objects.")
        return None
    kind = body.get("type") if isinstance(body, dict) else None
    if kind != "danmaku":
        await _send_error(ws, "unknown_message", 'The only message a client sends is "danmaku".')
        return None
    if identity is None:
        return CLOSE_UNAUTHENTICATED, "sign in to send danmaku"
    try:
        new = parse_new_danmaku(body, allowed=frozenset({"type"}))
        item = await service.create(identity, video_id, new)
    except RateLimitedError:
        return CLOSE_RATE_LIMITED, "danmaku rate limit"
    except NotFoundError:
        return CLOSE_NOT_FOUND, "the video is gone"
    except ValidationError as error:
        await _send_error(ws, error.instance_code, error.detail, error.extra.get("errors"))
        return None
    except AppError as error:
        await _send_error(ws, error.instance_code, error.detail)
        return None
    await ws.send_str(orjson.dumps({"type": "sent", "id": item["id"]}).decode())
    return None


async def _send_error(
    ws: web.WebSocketResponse, code: str, detail: str, errors: Any = None
) -> None:
    body: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if errors:
        body["errors"] = errors
    await ws.send_str(orjson.dumps(body).decode())
