"""Sign-in throttling under parallel guesses, names padded past the lockout, sign-up floods.

The throttle must hold when a burst of guesses arrives at once: every guess of the burst
reaches the api before any of them has failed. ``HeldVerifications`` recreates that on
purpose: it holds each password verification until the refusals of the burst are back, so
a throttle that checks before counting lets every guess through to a hash, and one that
counts first refuses all but the allowance. Hashes are counted where Argon2 computes them.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import ClientResponse
from argon2 import PasswordHasher as Argon2Hasher

from api_service.app import create_app
from api_service.services.passwords import PasswordHasher
from shared.kv import open_kv
from shared.settings import Settings
from tests.api.test_accounts import Api
from tests.problems import problem
from tests.stack import PASSWORD, start_stack

PASSWORD_OK = "correct horse"


@dataclass
class Argon2Calls:
    """Argon2 computations in any thread, counted as they start."""

    hashed: int = 0
    verified: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def argon2_calls(monkeypatch: pytest.MonkeyPatch) -> Argon2Calls:
    calls = Argon2Calls()
    real_hash, real_verify = Argon2Hasher.hash, Argon2Hasher.verify

    def counted_hash(
        self: Argon2Hasher, password: str | bytes, *, salt: bytes | None = None
    ) -> str:
        with calls.lock:
            calls.hashed += 1
        return real_hash(self, password, salt=salt)

    def counted_verify(self: Argon2Hasher, stored: str | bytes, password: str | bytes) -> bool:
        with calls.lock:
            calls.verified += 1
        return real_verify(self, stored, password)

    monkeypatch.setattr(Argon2Hasher, "hash", counted_hash)
    monkeypatch.setattr(Argon2Hasher, "verify", counted_verify)
    return calls


@dataclass
class HeldVerifications:
    """Holds every sign-in's verification until ``release``; lets go by itself once more
    than ``allowed`` are held (the throttle failed; the counts then show by how much)."""

    allowed: int = 0
    held: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldVerifications]:
    holding = HeldVerifications()
    real_verify = PasswordHasher.verify

    async def held_verify(self: PasswordHasher, stored_hash: str | None, password: str) -> bool:
        holding.held += 1
        if holding.held > holding.allowed:
            holding.release.set()
        await holding.release.wait()
        return await real_verify(self, stored_hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", held_verify)
    yield holding
    holding.release.set()


async def burst(
    send: Callable[[Any], Awaitable[ClientResponse]],
    bodies: list[Any],
    holding: HeldVerifications,
    *,
    allowed: int,
) -> list[tuple[int, ClientResponse]]:
    """Sends every body at once; verifications are held until ``len(bodies) - allowed``
    refusals are back. Returns (status, response) in the order the answers came."""
    holding.allowed = allowed
    refusals_due = len(bodies) - allowed
    tasks = [asyncio.ensure_future(send(body)) for body in bodies]
    answers: list[tuple[int, ClientResponse]] = []
    try:
        for next_answer in asyncio.as_completed(tasks):
            response = await next_answer
            await response.read()
            answers.append((response.status, response))
            if sum(status == 429 for status, _ in answers) >= refusals_due:
                holding.release.set()
    finally:
        holding.release.set()
    return answers


async def assert_too_many_attempts(response: ClientResponse) -> None:
    await problem(response, 429, "too_many_attempts")
    assert int(response.headers["Retry-After"]) > 0


@pytest.fixture
async def api(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    internal_headers: dict[str, str],
) -> Api:
    """The api on the default limits: 10 failures per account, 50 per address."""
    return Api(await aiohttp_client(create_app(make_settings())), internal_headers)


def sign_in_body(username: str, password: str) -> dict[str, str]:
    return {"username": username, "password": password}


async def test_parallel_guesses_for_one_account_verify_at_most_the_limit(
    api: Api, held: HeldVerifications, argon2_calls: Argon2Calls
) -> None:
    await api.sign_up("victim")
    guesses = [sign_in_body("victim", f"guess {i:02d}") for i in range(30)]
    answers = await burst(
        lambda body: api.post("/api/v1/sessions", body), guesses, held, allowed=10
    )
    assert Counter(status for status, _ in answers) == {401: 10, 429: 20}
    assert argon2_calls.verified == 10
    for status, response in answers:
        if status == 429:
            await assert_too_many_attempts(response)
    # Locked: the right password waits out the window too, and costs no hash.
    await assert_too_many_attempts(
        await api.post("/api/v1/sessions", sign_in_body("victim", PASSWORD_OK))
    )
    assert argon2_calls.verified == 10


async def test_parallel_guesses_from_one_address_verify_at_most_its_limit(
    api: Api, held: HeldVerifications, argon2_calls: Argon2Calls
) -> None:
    # 70 names, one guess each: no account reaches its own limit, the address does (5 x 10).
    guesses = [sign_in_body(f"someone{i:02d}", "a guess at it") for i in range(70)]
    answers = await burst(
        lambda body: api.post("/api/v1/sessions", body), guesses, held, allowed=50
    )
    assert Counter(status for status, _ in answers) == {401: 50, 429: 20}
    assert argon2_calls.verified == 50
    for status, response in answers:
        if status == 429:
            await assert_too_many_attempts(response)
    # Another address is not held back by this one.
    other = await api.client.post(
        "/api/v1/sessions",
        json=sign_in_body("someone00", "a guess at it"),
        headers=api.headers(**{"X-Forwarded-For": "198.51.100.20"}),
    )
    await problem(other, 401, "invalid_credentials")


async def test_a_success_gives_its_attempt_back_to_the_address(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    internal_headers: dict[str, str],
) -> None:
    # 2 failures per account, so 10 per address: signing in right does not use them up.
    app = create_app(make_settings(VOD_LOGIN_MAX_FAILURES="2"))
    api = Api(await aiohttp_client(app), internal_headers)
    await api.sign_up("regular")
    for _ in range(12):
        await api.sign_in("regular", PASSWORD_OK)
    for _ in range(2):
        await problem(
            await api.post("/api/v1/sessions", sign_in_body("regular", "wrong one")),
            401,
            "invalid_credentials",
        )
    await assert_too_many_attempts(
        await api.post("/api/v1/sessions", sign_in_body("regular", PASSWORD_OK))
    )


# -- names padded past the lockout -----------------------------------------------------------


@pytest.fixture(params=["embedded", pytest.param("mariadb", marks=pytest.mark.integration)])
async def any_api(
    request: pytest.FixtureRequest,
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    internal_headers: dict[str, str],
) -> AsyncIterator[Api]:
    """The api with 3 failures per account, on SQLite or on MariaDB (whose ``utf8mb4_bin``
    compares with PAD SPACE: ``'victim   ' = 'victim'``), Redis and RabbitMQ."""
    real: dict[str, str] = (
        request.getfixturevalue("real_backends_env") if request.param == "mariadb" else {}
    )
    settings = make_settings(**real, VOD_LOGIN_MAX_FAILURES="3")
    yield Api(await aiohttp_client(create_app(settings)), internal_headers)
    if real:
        kv = await open_kv(settings.redis_url, settings.namespace)
        try:
            await kv.delete_namespace()
        finally:
            await kv.close()


async def test_padded_names_do_not_get_past_the_lockout(
    any_api: Api, argon2_calls: Argon2Calls
) -> None:
    name = f"victim_{secrets.token_hex(3)}"  # the MariaDB database lives for the whole run
    await any_api.sign_up(name)
    for i in range(3):
        await problem(
            await any_api.post("/api/v1/sessions", sign_in_body(name, f"guess {i}")),
            401,
            "invalid_credentials",
        )
    verified = argon2_calls.verified
    # Names no account can have: refused before any lookup, without a hash, with the
    # answer a wrong password gets.
    for padded in (f"{name}   ", f"{name} ", f"{name}\t", f"{name}\n", f" {name}"):
        response = await any_api.post("/api/v1/sessions", sign_in_body(padded, PASSWORD_OK))
        await problem(response, 401, "invalid_credentials")
    assert argon2_calls.verified == verified
    # Another spelling of the same account shares its lockout, right password or not.
    for spelling in (name, name.upper(), name.capitalize()):
        await assert_too_many_attempts(
            await any_api.post("/api/v1/sessions", sign_in_body(spelling, PASSWORD_OK))
        )
    assert argon2_calls.verified == verified


async def test_a_name_with_a_trailing_newline_cannot_sign_up(api: Api) -> None:
    # "$" alone matches before a final newline: the pattern must cover the whole name.
    response = await api.post("/api/v1/users", {"username": "bob\n", "password": "long enough"})
    await problem(response, 400, "validation_failed")
    await api.sign_up("bob")


# -- sign-up floods ----------------------------------------------------------------------------


async def test_sign_ups_are_limited_per_address_with_rate_limit_headers(
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    argon2_calls: Argon2Calls,
) -> None:
    stack = await start_stack(
        make_settings(VOD_SIGNUP_RATE="5/3600"), aiohttp_server, aiohttp_client
    )
    names = [f"flood{i:02d}_{secrets.token_hex(2)}" for i in range(8)]
    hashed = argon2_calls.hashed

    async def sign_up(username: str) -> ClientResponse:
        # A client's own X-Forwarded-For is dropped at the gateway: no way to look like
        # many addresses.
        response = await stack.gateway.post(
            "/api/v1/users",
            json={"username": username, "password": PASSWORD},
            headers={"X-Forwarded-For": f"203.0.113.{secrets.randbelow(250)}"},
        )
        await response.read()
        return response

    responses = await asyncio.gather(*(sign_up(name) for name in names))
    assert Counter(response.status for response in responses) == {201: 5, 429: 3}
    assert argon2_calls.hashed - hashed == 5  # a refused sign-up costs no hash
    for name, response in zip(names, responses, strict=True):
        if response.status != 429:
            continue
        body = await problem(response, 429, "signups_rate_limited")
        retry_after = int(response.headers["Retry-After"])
        assert 0 < retry_after <= 3600
        assert body["retry_after"] == retry_after
        assert response.headers["RateLimit-Limit"] == "5"
        assert response.headers["RateLimit-Remaining"] == "0"
        assert response.headers["RateLimit-Reset"] == str(retry_after)
        assert response.headers["RateLimit-Policy"] == "5;w=3600"
        # Nothing of a refused sign-up was written: its name was never taken.
        await problem(await stack.gateway.get(f"/api/v1/users/{name}"), 404, "user_not_found")
