"""Users and sessions: parse, call one service, serialise."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api_service.keys import SESSIONS, USERS
from api_service.repositories.users import User
from api_service.schemas import (
    parse_cookie_mode,
    parse_credentials,
    parse_new_user,
    parse_refresh_token,
)
from api_service.services.sessions import TokenPair
from api_service.session_cookies import (
    DEVICE_COOKIE,
    REFRESH_COOKIE,
    clear_session_cookies,
    cookie_value,
    refuse_cross_site,
    set_session_cookies,
)
from shared.errors import UnauthorizedError
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


def token_response(request: web.Request, pair: TokenPair) -> web.Response:
    """A device-bound pair's refresh token goes in cookies only, never in the body."""
    if pair.device_id is None:
        return json_response(token_json(pair), headers=NO_STORE)
    body = token_json(pair)
    del body["refresh_token"]
    response = json_response(body, headers=NO_STORE)
    set_session_cookies(request, response, pair, pair.device_id)
    return response


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
    body = await read_json(request)
    credentials = parse_credentials(body)
    cookie_mode = parse_cookie_mode(body)
    if cookie_mode:
        refuse_cross_site(request)
    pair = await request.app[SESSIONS].sign_in(
        credentials.username,
        credentials.password,
        address=client_address(request),
        bind_device=cookie_mode,
    )
    return token_response(request, pair)


async def refresh_session(request: web.Request) -> web.Response:
    """A JSON body names the token (API clients); no body means the page's cookie."""
    if request.body_exists:
        presented = parse_refresh_token(await read_json(request))
    else:
        refuse_cross_site(request)
        cookie = cookie_value(request, REFRESH_COOKIE)
        if cookie is None:
            raise UnauthorizedError(
                "Send a refresh_token in the body, or sign in again.",
                code="refresh_token_missing",
            )
        presented = cookie
    pair = await request.app[SESSIONS].refresh(
        presented, device_id=cookie_value(request, DEVICE_COOKIE)
    )
    return token_response(request, pair)


async def delete_session(request: web.Request) -> web.Response:
    await request.app[SESSIONS].sign_out(require_identity(request))
    response = web.Response(status=204)
    clear_session_cookies(request, response)
    return response
