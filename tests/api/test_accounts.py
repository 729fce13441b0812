"""Users and sessions against the api service's real factory (embedded back ends)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api_service.app import create_app
from shared.auth import TokenVerifier
from shared.settings import Settings
from tests.conftest import JWT_PUBLIC_KEY
from tests.problems import problem

Client = TestClient[web.Request, web.Application]


class Api:
    """The api service as the gateway talks to it: internal token, identity headers."""

    def __init__(self, client: Client, internal: dict[str, str]) -> None:
        self.client = client
        self.internal = internal
        self.verifier = TokenVerifier(JWT_PUBLIC_KEY)

    def headers(self, access_token: str | None = None, **extra: str) -> dict[str, str]:
        headers = dict(self.internal) | extra
        if access_token is not None:
            # What the gateway does after verifying the token.
            headers |= self.verifier.verify(access_token).to_headers()
        return headers

    async def post(self, path: str, body: Any, access_token: str | None = None) -> Any:
        return await self.client.post(path, json=body, headers=self.headers(access_token))

    async def sign_up(self, username: str, password: str = "correct horse") -> dict[str, Any]:
        response = await self.post("/api/v1/users", {"username": username, "password": password})
        assert response.status == 201, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    async def sign_in(self, username: str, password: str = "correct horse") -> dict[str, Any]:
        response = await self.post("/api/v1/sessions", {"username": username, "password": password})
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


@pytest.fixture
async def api(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    internal_headers: dict[str, str],
) -> Api:
    settings = make_settings(VOD_LOGIN_MAX_FAILURES="3")
    return Api(await aiohttp_client(create_app(settings)), internal_headers)


async def test_sign_up_returns_the_user_and_hides_the_password(api: Api) -> None:
    body = await api.sign_up("alice")
    assert set(body) == {"id", "username", "created_at"}
    assert body["username"] == "alice"
    assert body["created_at"].endswith("+00:00")


async def test_username_taken_in_any_case_is_409(api: Api) -> None:
    await api.sign_up("alice")
    response = await api.post("/api/v1/users", {"username": "ALICE", "password": "whatever1"})
    await problem(response, 409, "username_taken")


@pytest.mark.parametrize(
    "body",
    [
        {"username": "al", "password": "long enough"},
        {"username": "a" * 33, "password": "long enough"},
        {"username": "bad name", "password": "long enough"},
        {"username": "me", "password": "long enough"},
        {"username": "bob", "password": "short"},
        {"username": "bob", "password": "x" * 129},
        {"username": 5, "password": "long enough"},
        {"username": "bob"},
        [],
        "just a string",
    ],
)
async def test_invalid_sign_up_is_400_and_creates_nothing(api: Api, body: Any) -> None:
    await problem(await api.post("/api/v1/users", body), 400, "validation_failed")
    # Nothing was written: the clean name can still be taken.
    await api.sign_up("bob")


async def test_sign_in_gives_a_verifiable_token_pair(api: Api) -> None:
    user = await api.sign_up("carol")
    response = await api.post(
        "/api/v1/sessions", {"username": "carol", "password": "correct horse"}
    )
    assert response.headers["Cache-Control"] == "no-store"
    tokens = await response.json()
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 900
    identity = api.verifier.verify(tokens["access_token"])
    assert identity.user_id == user["id"]
    assert identity.username == "carol"


async def test_wrong_password_and_unknown_user_look_the_same(api: Api) -> None:
    await api.sign_up("dave")
    wrong = await problem(
        await api.post("/api/v1/sessions", {"username": "dave", "password": "not it at all"}),
        401,
        "invalid_credentials",
    )
    unknown = await problem(
        await api.post("/api/v1/sessions", {"username": "nobody", "password": "not it at all"}),
        401,
        "invalid_credentials",
    )
    assert wrong["detail"] == unknown["detail"]


async def test_repeated_failures_are_throttled_with_retry_after(api: Api) -> None:
    await api.sign_up("erin")
    for _ in range(3):
        await problem(
            await api.post("/api/v1/sessions", {"username": "erin", "password": "guess guess"}),
            401,
            "invalid_credentials",
        )
    response = await api.post("/api/v1/sessions", {"username": "erin", "password": "correct horse"})
    await problem(response, 429, "too_many_attempts")
    assert int(response.headers["Retry-After"]) > 0


async def test_me_needs_identity_and_returns_the_user(api: Api) -> None:
    await problem(
        await api.client.get("/api/v1/users/me", headers=api.internal), 401, "unauthorized"
    )
    await api.sign_up("frank")
    tokens = await api.sign_in("frank")
    response = await api.client.get("/api/v1/users/me", headers=api.headers(tokens["access_token"]))
    assert response.status == 200
    assert (await response.json())["username"] == "frank"


async def test_public_profile_and_unknown_user(api: Api) -> None:
    await api.sign_up("grace")
    response = await api.client.get("/api/v1/users/Grace", headers=api.internal)
    assert response.status == 200
    body = await response.json()
    assert body["username"] == "grace"
    assert body["video_count"] == 0
    await problem(
        await api.client.get("/api/v1/users/nobody", headers=api.internal), 404, "user_not_found"
    )


async def test_refresh_rotates_and_each_token_is_single_use(api: Api) -> None:
    await api.sign_up("heidi")
    first = await api.sign_in("heidi")
    response = await api.post("/api/v1/sessions/refresh", {"refresh_token": first["refresh_token"]})
    assert response.status == 200
    second = await response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert api.verifier.verify(second["access_token"]).username == "heidi"


async def test_reusing_a_spent_refresh_token_revokes_the_whole_family(api: Api) -> None:
    await api.sign_up("ivan")
    first = await api.sign_in("ivan")
    rotated = await (
        await api.post("/api/v1/sessions/refresh", {"refresh_token": first["refresh_token"]})
    ).json()
    # The thief replays the spent token: refused, and the family is revoked...
    await problem(
        await api.post("/api/v1/sessions/refresh", {"refresh_token": first["refresh_token"]}),
        401,
        "refresh_token_reused",
    )
    # ...including the legitimate newest token.
    await problem(
        await api.post("/api/v1/sessions/refresh", {"refresh_token": rotated["refresh_token"]}),
        401,
        "refresh_token_invalid",
    )


async def test_unknown_refresh_token_is_401(api: Api) -> None:
    await problem(
        await api.post("/api/v1/sessions/refresh", {"refresh_token": "made-up"}),
        401,
        "refresh_token_invalid",
    )
    await problem(await api.post("/api/v1/sessions/refresh", {}), 400, "validation_failed")


async def test_sign_out_revokes_the_refresh_family(api: Api) -> None:
    await api.sign_up("judy")
    tokens = await api.sign_in("judy")
    response = await api.client.delete(
        "/api/v1/sessions", headers=api.headers(tokens["access_token"])
    )
    assert response.status == 204
    await problem(
        await api.post("/api/v1/sessions/refresh", {"refresh_token": tokens["refresh_token"]}),
        401,
        "refresh_token_invalid",
    )
    await problem(
        await api.client.delete("/api/v1/sessions", headers=api.internal), 401, "unauthorized"
    )
