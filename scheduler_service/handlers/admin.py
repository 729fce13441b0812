"""The admin API: parse, check the caller is an admin, one service call, serialise."""

from __future__ import annotations

from aiohttp import web

from scheduler_service.keys import ADMIN
from scheduler_service.services.admin import MAX_LIMIT, AdminService
from shared.errors import BadRequestError
from shared.web import json_response, require_identity

DEFAULT_LIMIT = 20


async def _admin(request: web.Request) -> AdminService:
    identity = require_identity(request)
    service = request.app[ADMIN]
    await service.require_admin(identity)
    return service


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    # isascii: str.isdigit() accepts Unicode digits ("²") that int() refuses.
    digits = raw.isascii() and raw.isdigit() and len(raw) <= len(str(MAX_LIMIT))
    if not digits or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequestError(
            f"limit must be an integer from 1 to {MAX_LIMIT}.", code="invalid_limit"
        )
    return int(raw)


async def list_queues(request: web.Request) -> web.Response:
    service = await _admin(request)
    return json_response({"items": await service.queues()})


async def list_jobs(request: web.Request) -> web.Response:
    service = await _admin(request)
    return json_response({"items": await service.jobs()})


async def list_parked(request: web.Request) -> web.Response:
    service = await _admin(request)
    limit = _limit(request)
    queue = request.match_info["queue"]
    return json_response({"items": await service.parked(queue, limit=limit)})


async def requeue_parked(request: web.Request) -> web.Response:
    service = await _admin(request)
    limit = _limit(request)
    queue = request.match_info["queue"]
    moved = await service.requeue(queue, limit=limit)
    return json_response({"queue": queue, "requeued": moved})


async def get_deletion(request: web.Request) -> web.Response:
    service = await _admin(request)
    return json_response(await service.deletion(request.match_info["video_id"]))
