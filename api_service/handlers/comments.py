"""Comments: parse, call the comment service, serialise."""

from __future__ import annotations

from aiohttp import web

from api_service.keys import COMMENTS
from api_service.schemas import parse_list_params, parse_new_comment
from shared.web import json_response, read_json, require_identity


async def list_comments(request: web.Request) -> web.Response:
    params = parse_list_params(request.query, allow_author=False)
    items, next_cursor = await request.app[COMMENTS].list(
        request.match_info["video_id"], limit=params.limit, cursor=params.cursor
    )
    return json_response({"items": items, "next_cursor": next_cursor})


async def create_comment(request: web.Request) -> web.Response:
    identity = require_identity(request)
    content = parse_new_comment(await read_json(request))
    video_id = request.match_info["video_id"]
    comment = await request.app[COMMENTS].create(identity, video_id, content)
    location = f"/api/v1/videos/{video_id}/comments/{comment['id']}"
    return json_response(comment, status=201, headers={"Location": location})


async def delete_comment(request: web.Request) -> web.Response:
    identity = require_identity(request)
    await request.app[COMMENTS].delete(
        identity, request.match_info["video_id"], request.match_info["comment_id"]
    )
    return web.Response(status=204)
