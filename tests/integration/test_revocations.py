"""Sign-outs survive a lost Redis: revocations are kept in the database until the tokens
they name expire, and copied back into a key-value store that comes back empty (the
in-process store of a restarted standalone process, a flushed or restarted real Redis).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from api_service.keys import REVOCATIONS
from shared.auth import (
    REVOCATIONS_RESTORED_KEY,
    TokenVerifier,
    revoked_family_key,
    revoked_token_key,
)
from shared.db.schema import token_revocations
from shared.kv import open_kv
from shared.resources import DB, KV
from shared.settings import Settings
from tests.clients import Publisher
from tests.conftest import JWT_PUBLIC_KEY
from tests.integration.test_live import answering, close_frame, direct_to_api, live, token_of
from tests.private_servers import RedisServer
from tests.problems import problem
from tests.stack import Stack, start_stack

WAIT = 10.0


@dataclasses.dataclass
class Session:
    """One sign-in: an access token from the sign-in, another from a refresh (the same
    family), both signed out by signing out with the second."""

    older: str
    newer: str


async def sign_in_twice_and_sign_out(stack: Stack) -> Session:
    user = await stack.sign_up()
    first = await stack.sign_in(user["username"])
    refreshed = await stack.gateway.post(
        "/api/v1/sessions/refresh", json={"refresh_token": first["refresh_token"]}
    )
    assert refreshed.status == 200, await refreshed.text()
    second = await refreshed.json()
    session = Session(older=first["access_token"], newer=second["access_token"])
    signed_out = await stack.gateway.delete(
        "/api/v1/sessions", headers={"Authorization": f"Bearer {session.newer}"}
    )
    assert signed_out.status == 204
    await assert_refused(stack, session)
    return session


async def assert_refused(stack: Stack, session: Session) -> None:
    for token in (session.older, session.newer):
        response = await stack.gateway.get(
            "/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}
        )
        await problem(response, 401, "token_revoked")


async def stop(stack: Stack) -> None:
    await stack.gateway.close()
    for server in stack.servers.values():
        await server.close()


async def test_a_signed_out_token_stays_refused_after_a_restart_with_a_new_in_process_store(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    first = await start_stack(settings, aiohttp_server, aiohttp_client)
    session = await sign_in_twice_and_sign_out(first)
    await stop(first)

    # Standalone restarted: the same SQLite file, a new (empty) in-process Redis.
    restarted = dataclasses.replace(settings, redis_url=f"memory://{secrets.token_hex(6)}")
    second = await start_stack(restarted, aiohttp_server, aiohttp_client)
    await assert_refused(second, session)


@pytest.fixture
async def real_stack_settings(
    make_settings: Callable[..., Settings], real_backends_env: dict[str, str]
) -> AsyncIterator[Settings]:
    settings = make_settings(**real_backends_env)
    yield settings
    kv = await open_kv(settings.redis_url, settings.namespace)
    try:
        await kv.delete_namespace()
    finally:
        await kv.close()


@pytest.mark.integration
async def test_a_signed_out_token_stays_refused_after_its_keys_are_flushed(
    aiohttp_server: Any, aiohttp_client: Any, real_stack_settings: Settings
) -> None:
    stack = await start_stack(real_stack_settings, aiohttp_server, aiohttp_client)
    session = await sign_in_twice_and_sign_out(stack)
    revocations = stack.servers["api"].app[REVOCATIONS]
    restores = revocations.restores

    # Every key of this test gone, the connections untouched (FLUSHDB, a failover to an
    # empty replica): the api notices on its next check and restores.
    kv = await open_kv(real_stack_settings.redis_url, real_stack_settings.namespace)
    try:
        assert await kv.delete_namespace() > 0
    finally:
        await kv.close()
    # Before or after the restore, never let through: refused, or 503 until restored.
    meanwhile = await stack.gateway.get(
        "/api/v1/users/me", headers={"Authorization": f"Bearer {session.older}"}
    )
    assert meanwhile.status in (401, 503), await meanwhile.text()
    async with asyncio.timeout(WAIT):
        await revocations.wait_for_restores(restores + 1)
    await assert_refused(stack, session)


@pytest.mark.integration
async def test_a_signed_out_token_stays_refused_after_redis_restarts_empty(
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path) as redis_server:  # no persistence: it restarts empty
        settings = make_settings(VOD_REDIS_URL=redis_server.url)
        stack = await start_stack(settings, aiohttp_server, aiohttp_client)
        session = await sign_in_twice_and_sign_out(stack)
        revocations = stack.servers["api"].app[REVOCATIONS]
        restores = revocations.restores

        await asyncio.to_thread(redis_server.restart)
        async with asyncio.timeout(WAIT):
            await revocations.wait_for_restores(restores + 1)
        await assert_refused(stack, session)
        await stop(stack)


@pytest.fixture(params=["embedded", pytest.param("real", marks=pytest.mark.integration)])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """SQLite and the in-process Redis, or MariaDB and the real Redis."""
    stack: Stack = request.getfixturevalue("stack" if request.param == "embedded" else "real_stack")
    return stack


async def test_revocations_are_kept_until_their_tokens_expire_and_then_removed(
    any_stack: Stack,
) -> None:
    db = any_stack.servers["api"].app[DB]
    now = datetime.now(UTC)
    expired = f"expired-{secrets.token_hex(8)}"
    async with db.transaction() as conn:
        await conn.execute(
            token_revocations.insert().values(
                kind="jti",
                subject=expired,
                expires_at=now - timedelta(hours=1),
                revoked_at=now - timedelta(hours=2),
            )
        )
    user = await any_stack.sign_up()
    tokens = await any_stack.sign_in(user["username"])
    identity = TokenVerifier(JWT_PUBLIC_KEY).verify(tokens["access_token"])
    signed_out = await any_stack.gateway.delete(
        "/api/v1/sessions", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert signed_out.status == 204

    async with db.connect() as conn:
        rows = (
            await conn.execute(
                select(token_revocations).where(
                    token_revocations.c.subject.in_(
                        [expired, identity.token_id, identity.family_id]
                    )
                )
            )
        ).mappings()
        kept = {(row["kind"], row["subject"]): row["expires_at"] for row in rows}
    # The token until its own expiry, the family until the last token it may have
    # issued has expired; the row nobody needs any more went with the write.
    assert set(kept) == {("jti", identity.token_id), ("family", identity.family_id)}
    token_expiry = datetime.fromtimestamp(identity.expires_at, UTC)
    assert kept["jti", identity.token_id] == token_expiry
    assert kept["family", identity.family_id] >= token_expiry


async def test_revoking_a_family_again_keeps_the_later_expiry(any_stack: Stack) -> None:
    # Two replicas may revoke one family at once (a refresh token replayed to both).
    app = any_stack.servers["api"].app
    revocations, db = app[REVOCATIONS], app[DB]
    family_id = secrets.token_hex(13)
    await revocations.revoke_family(family_id, seconds=600)
    await revocations.revoke_family(family_id, seconds=1200)
    await revocations.revoke_family(family_id, seconds=60)
    async with db.connect() as conn:
        expiries = (
            await conn.scalars(
                select(token_revocations.c.expires_at).where(
                    token_revocations.c.subject == family_id
                )
            )
        ).all()
    assert len(expiries) == 1
    left = expiries[0] - datetime.now(UTC)
    assert timedelta(seconds=1100) < left <= timedelta(seconds=1200)
    # The copy the gateway reads lives as long.
    assert 1100 < await app[KV].ttl(revoked_family_key(family_id)) <= 1200


async def test_a_restore_copies_every_unexpired_revocation_whatever_their_number(
    any_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("api_service.repositories.token_revocations.RESTORE_BATCH", 2)
    app = any_stack.servers["api"].app
    revocations, kv = app[REVOCATIONS], app[KV]
    token_ids = [secrets.token_hex(16) for _ in range(5)]
    expires_at = int(datetime.now(UTC).timestamp()) + 600
    for token_id in token_ids:
        await revocations.revoke_token(token_id, expires_at=expires_at)
    await kv.delete(REVOCATIONS_RESTORED_KEY, *(revoked_token_key(t) for t in token_ids))

    assert await revocations.restore_if_empty()
    assert [await kv.exists(revoked_token_key(t)) for t in token_ids] == [True] * 5
    assert 590 <= await kv.ttl(revoked_token_key(token_ids[0])) <= 600
    # Restored once: the next check finds the marker and copies nothing.
    assert not await revocations.restore_if_empty()


async def test_a_socket_opened_while_the_store_was_empty_is_closed_by_the_restore(
    any_stack: Stack,
) -> None:
    app = any_stack.servers["api"].app
    revocations, kv = app[REVOCATIONS], app[KV]
    alice = Publisher(any_stack, "alice", await any_stack.new_user())
    video = await alice.video()
    token = token_of(alice)
    identity = TokenVerifier(JWT_PUBLIC_KEY).verify(token)
    signed_out = await any_stack.gateway.delete("/api/v1/sessions", headers=alice.auth)
    assert signed_out.status == 204
    # The store lost the revocation and no replica has noticed yet (the marker stays
    # until the moment the test chooses): a socket with the token gets in.
    await kv.delete(revoked_token_key(identity.token_id), revoked_family_key(identity.family_id))
    socket = await direct_to_api(any_stack, live(video["id"]), token)
    async with socket:
        await answering(socket)
        restores = revocations.restores
        await kv.delete(REVOCATIONS_RESTORED_KEY)
        async with asyncio.timeout(WAIT):
            await revocations.wait_for_restores(restores + 1)
            assert await close_frame(socket) == 4401
