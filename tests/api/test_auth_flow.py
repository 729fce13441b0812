"""Accounts and tokens end to end through the gateway: what a client and an attacker see."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.auth import AUDIENCE, ISSUER
from tests.conftest import JWT_PRIVATE_KEY, JWT_PUBLIC_KEY
from tests.problems import problem
from tests.stack import PASSWORD, Stack


async def me(stack: Stack, headers: dict[str, str]) -> Any:
    return await stack.gateway.get("/api/v1/users/me", headers=headers)


async def journey(stack: Stack) -> None:
    user = await stack.sign_up()
    tokens = await stack.sign_in(user["username"])
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}

    response = await me(stack, auth)
    assert response.status == 200
    assert (await response.json())["id"] == user["id"]

    refreshed = await stack.gateway.post(
        "/api/v1/sessions/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert refreshed.status == 200
    new_tokens = await refreshed.json()
    new_auth = {"Authorization": f"Bearer {new_tokens['access_token']}"}
    assert (await me(stack, new_auth)).status == 200

    # Sign-out takes effect at once, not when the access token expires.
    assert (await stack.gateway.delete("/api/v1/sessions", headers=new_auth)).status == 204
    await problem(await me(stack, new_auth), 401, "token_revoked")
    # The whole family is gone: the earlier access token too, and the refresh token.
    await problem(await me(stack, auth), 401, "token_revoked")
    await problem(
        await stack.gateway.post(
            "/api/v1/sessions/refresh", json={"refresh_token": new_tokens["refresh_token"]}
        ),
        401,
        "refresh_token_invalid",
    )


async def test_sign_up_in_refresh_out_through_the_gateway(stack: Stack) -> None:
    await journey(stack)


@pytest.mark.integration
async def test_the_same_journey_on_mariadb_redis_rabbitmq(real_stack: Stack) -> None:
    await journey(real_stack)


async def cookie_journey(stack: Stack) -> None:
    """The web page's flow: the gateway's client keeps cookies as a browser does."""
    jar = stack.gateway.session.cookie_jar
    user = await stack.sign_up()
    signed_in = await stack.gateway.post(
        "/api/v1/sessions",
        json={"username": user["username"], "password": PASSWORD, "cookie": True},
    )
    assert signed_in.status == 200
    assert "refresh_token" not in await signed_in.json()
    first = {cookie.key: cookie.value for cookie in jar}
    assert set(first) == {"vod_refresh", "vod_device"}

    # Silent refresh: no body, the cookies do it, and the refresh cookie rotates.
    refreshed = await stack.gateway.post("/api/v1/sessions/refresh")
    assert refreshed.status == 200, await refreshed.text()
    tokens = await refreshed.json()
    assert "refresh_token" not in tokens
    assert {cookie.key: cookie.value for cookie in jar}["vod_refresh"] != first["vod_refresh"]
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert (await me(stack, auth)).status == 200

    # The first cookie, copied elsewhere without its device: refused, and the family is
    # revoked, the page's own session with it.
    jar.clear()
    await problem(
        await stack.gateway.post(
            "/api/v1/sessions/refresh", json={"refresh_token": first["vod_refresh"]}
        ),
        401,
        "refresh_token_wrong_device",
    )
    await problem(await me(stack, auth), 401, "token_revoked")


async def test_the_web_pages_cookie_flow_through_the_gateway(stack: Stack) -> None:
    await cookie_journey(stack)


@pytest.mark.integration
async def test_the_cookie_flow_on_mariadb_redis_rabbitmq(real_stack: Stack) -> None:
    await cookie_journey(real_stack)


async def test_stolen_refresh_token_replay_stops_the_thief_and_the_victim(stack: Stack) -> None:
    user = await stack.sign_up()
    stolen = await stack.sign_in(user["username"])
    # The victim refreshes first; the thief then replays the spent token.
    victim = await (
        await stack.gateway.post(
            "/api/v1/sessions/refresh", json={"refresh_token": stolen["refresh_token"]}
        )
    ).json()
    await problem(
        await stack.gateway.post(
            "/api/v1/sessions/refresh", json={"refresh_token": stolen["refresh_token"]}
        ),
        401,
        "refresh_token_reused",
    )
    # Every access token of that sign-in stops at the gateway at once.
    await problem(
        await me(stack, {"Authorization": f"Bearer {victim['access_token']}"}),
        401,
        "token_revoked",
    )


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "01ATTACKER",
        "name": "mallory",
        "jti": "j1",
        "fam": "f1",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(claims: dict[str, Any]) -> str:
    header = _b64(orjson.dumps({"alg": "none", "typ": "JWT"}))
    return f"{header}.{_b64(orjson.dumps(claims))}."


def _hs256_with_public_key(claims: dict[str, Any]) -> str:
    # The classic confusion attack: the verifier's public key used as an HMAC secret.
    # PyJWT refuses to *make* such a token, so it is built by hand.
    import hashlib
    import hmac

    header = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = _b64(orjson.dumps(claims))
    signature = hmac.new(JWT_PUBLIC_KEY.encode(), f"{header}.{body}".encode(), hashlib.sha256)
    return f"{header}.{body}.{_b64(signature.digest())}"


def _tampered(claims: dict[str, Any]) -> str:
    header, _body, signature = jwt.encode(claims, JWT_PRIVATE_KEY, algorithm="EdDSA").split(".")
    forged = _b64(orjson.dumps(claims | {"sub": "01SOMEONE_ELSE"}))
    return f"{header}.{forged}.{signature}"


FORGERIES: dict[str, Callable[[], str]] = {
    "alg none": lambda: _unsigned(_claims()),
    "HS256 with the public key": lambda: _hs256_with_public_key(_claims()),
    "tampered payload": lambda: _tampered(_claims()),
    "another key": lambda: jwt.encode(_claims(), Ed25519PrivateKey.generate(), algorithm="EdDSA"),
    "wrong issuer": lambda: jwt.encode(_claims(iss="evil"), JWT_PRIVATE_KEY, algorithm="EdDSA"),
    "wrong audience": lambda: jwt.encode(
        _claims(aud="other-app"), JWT_PRIVATE_KEY, algorithm="EdDSA"
    ),
    "issued in the future": lambda: jwt.encode(
        _claims(iat=int(time.time()) + 3600, exp=int(time.time()) + 7200),
        JWT_PRIVATE_KEY,
        algorithm="EdDSA",
    ),
    "no jti": lambda: jwt.encode(_claims(jti=None), JWT_PRIVATE_KEY, algorithm="EdDSA"),
    "garbage": lambda: "not.a.jwt",
}


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_forged_tokens_are_401_token_invalid(stack: Stack, forgery: str) -> None:
    token = FORGERIES[forgery]()
    await problem(await me(stack, {"Authorization": f"Bearer {token}"}), 401, "token_invalid")


async def test_expired_token_is_401_token_expired(stack: Stack) -> None:
    past = int(time.time()) - 3600
    token = jwt.encode(_claims(iat=past - 900, exp=past), JWT_PRIVATE_KEY, algorithm="EdDSA")
    response = await me(stack, {"Authorization": f"Bearer {token}"})
    await problem(response, 401, "token_expired")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_other_schemes_are_refused(stack: Stack) -> None:
    await problem(
        await me(stack, {"Authorization": "Basic YWxpY2U6c2VjcmV0"}), 401, "token_invalid"
    )


async def test_spoofed_identity_headers_do_not_sign_anyone_in(stack: Stack) -> None:
    user = await stack.sign_up()
    spoof = {"X-User-Id": user["id"], "X-Username": user["username"], "X-Token-Id": "x"}
    await problem(await me(stack, spoof), 401, "unauthorized")


async def test_upstream_refuses_a_direct_call_without_the_internal_token(stack: Stack) -> None:
    """Reaching the api around the gateway with forged identity headers gets nothing."""
    user = await stack.sign_up()
    api = stack.servers["api"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            api.make_url("/api/v1/users/me"), headers={"X-User-Id": user["id"]}
        ) as response,
    ):
        await problem(response, 403, "internal_token_required")
