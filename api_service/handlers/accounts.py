"""Users and sessions: parse, call one service, serialise."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api_service.keys import SESSIONS, USERS
from api_service.repositories.users import User
from api_service.schemas import parse_credentials, parse_new_user, parse_refresh_token
from api_service.services.sessions import TokenPair
from shared.web import json_response, read_json, request_identity, require_identity

# Token responses must never be stored by a browser or proxy cache (RFC 6749 §5.1).
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def user_json(user: User) -> dict[str, Any]:
    return {"id": user.id, "username": user.username, "created_at": user.created_at}


def token_json(pair: TokenPair) -> dict[str, Any]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "token_type": pair.token_type,
        "expires_in": pair.expires_in,
    }


def client_address(request: web.Request) -> str:
    """The caller's address as the gateway saw it: the last X-Forwarded-For hop it added."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    return hops[-1] if hops else (request.remote or "unknown")


async def create_user(request: web.Request) -> web.Response:
    credentials = parse_new_user(await read_json(request))
    user = await request.app[USERS].sign_up(
        credentials.username, credentials.password, address=client_address(request)
    )
    return json_response(
        user_json(user), status=201, headers={"Location": f"/api/v1/users/{user.username}"}
    )


async def get_me(request: web.Request) -> web.Response:
    user = await request.app[USERS].me(request_identity(request))
    return json_response(user_json(user), headers={"Cache-Control": "private, no-store"})


async def get_user(request: web.Request) -> web.Response:
    user, video_count = await request.app[USERS].profile(request.match_info["username"])
    return json_response(user_json(user) | {"video_count": video_count})


async def create_session(request: web.Request) -> web.Response:
    credentials = parse_credentials(await read_json(request))
    pair = await request.app[SESSIONS].sign_in(
        credentials.username, credentials.password, address=client_address(request)
    )
    return json_response(token_json(pair), headers=NO_STORE)


async def refresh_session(request: web.Request) -> web.Response:
    pair = await request.app[SESSIONS].refresh(parse_refresh_token(await read_json(request)))
    return json_response(token_json(pair), headers=NO_STORE)


async def delete_session(request: web.Request) -> web.Response:
    await request.app[SESSIONS].sign_out(require_identity(request))
    return web.Response(status=204)
