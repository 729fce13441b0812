"""Videos: parse, call the video service, serialise."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api_service.keys import USERS, VIDEOS
from api_service.repositories.videos import Video
from api_service.schemas import parse_list_params, parse_new_video, parse_video_changes
from shared.web import json_response, read_json, require_identity


def video_json(video: Video) -> dict[str, Any]:
    """The public shape of a video (``Video`` in gateway/openapi.json)."""
    body: dict[str, Any] = {
        "id": video.id,
        "title": video.title,
        "description": video.description,
        "author": {"id": video.owner_id, "username": video.owner_username},
        "created_at": video.created_at.isoformat(),
        "updated_at": video.updated_at.isoformat(),
        "status": video.status,
        "size": video.size,
        "content_hash": video.content_hash,
        "duration_ms": video.duration_ms,
        "stream_url": f"/api/v1/videos/{video.id}/stream",
        "thumbnail_url": f"/api/v1/videos/{video.id}/thumbnail" if video.has_thumbnail else None,
        "comment_count": video.comment_count,
    }
    if video.status == "failed":
        body["failure_reason"] = video.failure_reason
    return body


async def create_video(request: web.Request) -> web.Response:
    identity = require_identity(request)
    new = parse_new_video(await read_json(request))
    video = await request.app[VIDEOS].create(
        identity, title=new.title, description=new.description, upload_id=new.upload_id
    )
    return json_response(video, status=201, headers={"Location": f"/api/v1/videos/{video['id']}"})


async def list_videos(request: web.Request) -> web.Response:
    params = parse_list_params(request.query)
    items, next_cursor = await request.app[VIDEOS].list(
        limit=params.limit, cursor=params.cursor, author=params.author, query=params.query
    )
    return json_response({"items": items, "next_cursor": next_cursor})


async def list_user_videos(request: web.Request) -> web.Response:
    username = request.match_info["username"]
    await request.app[USERS].profile(username)  # 404 for an unknown user
    params = parse_list_params(request.query, allow_author=False)
    items, next_cursor = await request.app[VIDEOS].list(
        limit=params.limit, cursor=params.cursor, author=username, query=params.query
    )
    return json_response({"items": items, "next_cursor": next_cursor})


async def get_video(request: web.Request) -> web.Response:
    # The cached JSON text goes out as it is stored (the hottest read of the API).
    text = await request.app[VIDEOS].get_json(request.match_info["video_id"])
    return web.Response(body=text.encode(), content_type="application/json")


async def update_video(request: web.Request) -> web.Response:
    identity = require_identity(request)
    changes = parse_video_changes(await read_json(request))
    video = await request.app[VIDEOS].update(identity, request.match_info["video_id"], changes)
    return json_response(video)


async def delete_video(request: web.Request) -> web.Response:
    identity = require_identity(request)
    video_id = request.match_info["video_id"]
    await request.app[VIDEOS].delete(identity, video_id)
    return json_response({"id": video_id, "deletion": "scheduled"}, status=202)
