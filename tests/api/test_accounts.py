"""Users and sessions against the api service's real factory (embedded back ends)."""

from __future__ import annotations

from collections.abc import Callable
from http.cookies import Morsel, SimpleCookie
from typing import Any

import pytest
from aiohttp import DummyCookieJar, web
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
    # No cookie jar: the cookie-mode tests send exactly the cookies they mean to.
    client = await aiohttp_client(create_app(settings), cookie_jar=DummyCookieJar())
    return Api(client, internal_headers)


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


# --- cookie mode: the web page's refresh token out of JavaScript's reach -----------------

SESSIONS_PATH = "/api/v1/sessions"


def set_cookies(response: Any) -> dict[str, Morsel[str]]:
    """The cookies ``response`` sets, by name, with their attributes."""
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.getall("Set-Cookie", ()):
        jar.load(header)
    return dict(jar)


def cookie_header(**cookies: str) -> str:
    return "; ".join(f"{name}={value}" for name, value in cookies.items())


async def cookie_sign_in(api: Api, username: str, **headers: str) -> Any:
    return await api.client.post(
        SESSIONS_PATH,
        json={"username": username, "password": "correct horse", "cookie": True},
        headers=api.headers(**headers),
    )


async def cookie_refresh(api: Api, **cookies: str) -> Any:
    """What the page sends: a POST with no body, the browser adding the cookies."""
    headers = {"Sec-Fetch-Site": "same-origin"}
    if cookies:
        headers["Cookie"] = cookie_header(**cookies)
    return await api.client.post(f"{SESSIONS_PATH}/refresh", headers=api.headers(**headers))


async def test_cookie_sign_in_puts_the_refresh_token_in_httponly_cookies_only(api: Api) -> None:
    user = await api.sign_up("kim")
    response = await cookie_sign_in(api, "kim")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    # The access token in the body, as before; the refresh token nowhere a script can read.
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert api.verifier.verify(body["access_token"]).user_id == user["id"]
    cookies = set_cookies(response)
    assert set(cookies) == {"vod_refresh", "vod_device"}
    for morsel in cookies.values():
        assert morsel.value
        assert morsel["httponly"] is True
        assert morsel["samesite"] == "Strict"
        assert morsel["path"] == SESSIONS_PATH
        assert int(morsel["max-age"]) == 7 * 24 * 3600
        # Served over plain http (the gateway said so): not Secure, or no browser keeps it.
        assert not morsel["secure"]
    assert cookies["vod_refresh"].value != cookies["vod_device"].value


async def test_session_cookies_are_secure_when_the_page_came_over_https(
    api: Api,
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    internal_headers: dict[str, str],
) -> None:
    await api.sign_up("lena")
    # The gateway saw TLS itself ...
    over_tls = await cookie_sign_in(api, "lena", **{"X-Forwarded-Proto": "https"})
    assert over_tls.status == 200
    # ... or TLS ends at a balancer in front of it, and the setting says so (a second api
    # replica, on the same database).
    settings = make_settings(VOD_SECURE_COOKIES="1")
    behind_balancer = Api(
        await aiohttp_client(create_app(settings), cookie_jar=DummyCookieJar()), internal_headers
    )
    balanced = await cookie_sign_in(behind_balancer, "lena")
    assert balanced.status == 200
    for response in (over_tls, balanced):
        cookies = set_cookies(response)
        assert cookies["vod_refresh"]["secure"] is True
        assert cookies["vod_device"]["secure"] is True


async def test_cookie_refresh_rotates_the_cookie_and_each_token_is_single_use(api: Api) -> None:
    await api.sign_up("mona")
    first = set_cookies(await cookie_sign_in(api, "mona"))
    device = first["vod_device"].value
    response = await cookie_refresh(api, vod_refresh=first["vod_refresh"].value, vod_device=device)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert "refresh_token" not in body
    assert api.verifier.verify(body["access_token"]).username == "mona"
    rotated = set_cookies(response)
    assert rotated["vod_refresh"].value != first["vod_refresh"].value
    assert rotated["vod_refresh"]["httponly"] is True
    assert rotated["vod_device"].value == device
    # The new cookie works, the spent one is a reuse: the whole family goes.
    again = await cookie_refresh(api, vod_refresh=rotated["vod_refresh"].value, vod_device=device)
    assert again.status == 200
    await problem(
        await cookie_refresh(api, vod_refresh=first["vod_refresh"].value, vod_device=device),
        401,
        "refresh_token_reused",
    )
    await problem(
        await cookie_refresh(
            api, vod_refresh=set_cookies(again)["vod_refresh"].value, vod_device=device
        ),
        401,
        "refresh_token_invalid",
    )


@pytest.mark.parametrize("replay", ["cookie-without-device", "body-without-device", "other-device"])
async def test_a_refresh_token_without_its_device_is_refused_and_revokes_the_family(
    api: Api, replay: str
) -> None:
    await api.sign_up("nina")
    victim = set_cookies(await cookie_sign_in(api, "nina"))
    stolen = victim["vod_refresh"].value
    # The thief has the refresh token (read off the disk, a proxy's log, ...), not the
    # victim's device id.
    if replay == "cookie-without-device":
        response = await cookie_refresh(api, vod_refresh=stolen)
    elif replay == "body-without-device":
        response = await api.post(f"{SESSIONS_PATH}/refresh", {"refresh_token": stolen})
    else:
        own_device = set_cookies(await cookie_sign_in(api, "nina"))["vod_device"].value
        response = await cookie_refresh(api, vod_refresh=stolen, vod_device=own_device)
    await problem(response, 401, "refresh_token_wrong_device")
    # The family is revoked: the victim's own cookies no longer refresh.
    await problem(
        await cookie_refresh(api, vod_refresh=stolen, vod_device=victim["vod_device"].value),
        401,
        "refresh_token_invalid",
    )


async def test_json_clients_keep_the_body_flow_and_get_no_cookies(api: Api) -> None:
    await api.sign_up("olga")
    response = await api.post(SESSIONS_PATH, {"username": "olga", "password": "correct horse"})
    assert response.status == 200
    tokens = await response.json()
    assert tokens["refresh_token"]
    assert "Set-Cookie" not in response.headers
    # A device cookie the browser happens to hold does not matter to an unbound token.
    refreshed = await api.client.post(
        f"{SESSIONS_PATH}/refresh",
        json={"refresh_token": tokens["refresh_token"]},
        headers=api.headers(Cookie=cookie_header(vod_device="some-other-device")),
    )
    assert refreshed.status == 200
    assert (await refreshed.json())["refresh_token"] != tokens["refresh_token"]
    assert "Set-Cookie" not in refreshed.headers


async def test_a_refresh_with_neither_body_nor_cookie_is_401(api: Api) -> None:
    await problem(await cookie_refresh(api), 401, "refresh_token_missing")
    await problem(await cookie_refresh(api, vod_device="a-device"), 401, "refresh_token_missing")


async def test_cookie_mode_is_refused_to_another_origin_and_spends_nothing(api: Api) -> None:
    await api.sign_up("pia")
    await problem(
        await cookie_sign_in(api, "pia", **{"Sec-Fetch-Site": "same-site"}),
        403,
        "cross_site_request",
    )
    cookies = set_cookies(await cookie_sign_in(api, "pia", **{"Sec-Fetch-Site": "same-origin"}))
    jar = cookie_header(
        vod_refresh=cookies["vod_refresh"].value, vod_device=cookies["vod_device"].value
    )
    # A sibling host of the same site: SameSite=Strict lets the cookies through, the
    # browser's Sec-Fetch-Site tells.
    for site in ("same-site", "cross-site"):
        response = await api.client.post(
            f"{SESSIONS_PATH}/refresh", headers=api.headers(Cookie=jar, **{"Sec-Fetch-Site": site})
        )
        await problem(response, 403, "cross_site_request")
    # Nothing was spent: the page's own refresh still works.
    response = await cookie_refresh(
        api, vod_refresh=cookies["vod_refresh"].value, vod_device=cookies["vod_device"].value
    )
    assert response.status == 200


async def test_a_cookie_flag_that_is_not_a_boolean_is_400(api: Api) -> None:
    await api.sign_up("quin")
    response = await api.post(
        SESSIONS_PATH, {"username": "quin", "password": "correct horse", "cookie": "yes"}
    )
    await problem(response, 400, "validation_failed")


async def test_sign_out_clears_the_session_cookies(api: Api) -> None:
    await api.sign_up("rosa")
    signed_in = await cookie_sign_in(api, "rosa")
    access = (await signed_in.json())["access_token"]
    cookies = set_cookies(signed_in)
    response = await api.client.delete(SESSIONS_PATH, headers=api.headers(access))
    assert response.status == 204
    cleared = set_cookies(response)
    assert set(cleared) == {"vod_refresh", "vod_device"}
    for morsel in cleared.values():
        assert morsel.value == ""
        assert morsel["max-age"] == "0"
        assert morsel["path"] == SESSIONS_PATH
    await problem(
        await cookie_refresh(
            api, vod_refresh=cookies["vod_refresh"].value, vod_device=cookies["vod_device"].value
        ),
        401,
        "refresh_token_invalid",
    )
