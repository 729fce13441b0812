"""The contract of the database port, run against SQLite and the real MariaDB alike.

What later code relies on: migrations that can run twice, from two replicas at once, and
back down; transactions that commit or leave nothing behind; duplicate keys and outages
as our own exceptions; aware UTC times to the microsecond; autoincrementing outbox ids.
Every test starts from an empty schema: a new SQLite file, or a MariaDB database emptied
of every table.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, Table, exc, func, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import (
    Database,
    DatabaseUnavailableError,
    DuplicateKeyError,
    alembic_config,
    metadata,
    new_id,
    open_database,
    reads_on_primary,
    translate_errors,
)
from shared.db.schema import outbox, processed_messages, refresh_tokens, users
from shared.errors import ConfigError
from shared.settings import STANDALONE_DEFAULTS, Settings
from tests.clients import Publisher
from tests.conftest import mysql_database
from tests.stack import start_stack

pytestmark = pytest.mark.integration

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()
SCHEMA_TABLES = set(metadata.tables)


def _drop_every_table(conn: Connection) -> None:
    existing = MetaData()
    existing.reflect(conn)
    existing.drop_all(conn)


@pytest.fixture(params=["sqlite", "mysql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """An empty, unmigrated database of the parametrised kind."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/vod.db"
    else:
        url = request.getfixturevalue("mysql_database_url")
    db = await open_database(url)
    try:
        if db.dialect_name == "mysql":
            async with db.transaction() as conn:
                await conn.run_sync(_drop_every_table)
        yield db
    finally:
        await db.close()


@pytest.fixture
async def migrated(database: Database) -> Database:
    await database.migrate()
    return database


def _url_of(db: Database) -> str:
    return db.engine.url.render_as_string(hide_password=False)


def _user(username: str = "alice") -> dict[str, object]:
    return {
        "id": new_id(),
        "username": username,
        "username_key": username.lower(),
        "password_hash": "$argon2id$not-a-real-hash",
        "created_at": datetime.now(UTC),
    }


# SQLite's full-text search (migration 0003) is a virtual table with shadow tables of its
# own; they are an index, not part of the schema module.
_SEARCH_INDEX_PREFIX = "videos_search"


async def _table_names(db: Database) -> set[str]:
    async with db.connect() as conn:
        names = set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    return {name for name in names if not name.startswith(_SEARCH_INDEX_PREFIX)}


async def _revision(db: Database) -> str | None:
    async with db.connect() as conn:
        return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()


async def _count(conn: AsyncConnection, table: Table) -> int:
    return (await conn.execute(select(func.count()).select_from(table))).scalar_one()


async def test_migrate_creates_the_tables_and_may_run_twice(database: Database) -> None:
    await database.migrate()
    await database.migrate()

    assert await _table_names(database) == SCHEMA_TABLES | {"alembic_version"}
    assert await _revision(database) == HEAD


async def test_concurrent_migrations_both_succeed(database: Database) -> None:
    # Two replicas starting together: separate engines, so separate sessions.
    other = await open_database(_url_of(database))
    try:
        await asyncio.gather(database.migrate(), other.migrate())
    finally:
        await other.close()

    assert await _table_names(database) == SCHEMA_TABLES | {"alembic_version"}
    assert await _revision(database) == HEAD


async def test_downgrade_to_base_then_upgrade_again(migrated: Database) -> None:
    async with migrated.transaction() as conn:
        await conn.execute(users.insert().values(_user()))

    await migrated.downgrade("base")
    assert await _table_names(migrated) <= {"alembic_version"}
    assert await _revision(migrated) is None

    await migrated.migrate()
    assert await _table_names(migrated) == SCHEMA_TABLES | {"alembic_version"}
    async with migrated.connect() as conn:
        assert await _count(conn, users) == 0


async def test_committed_transaction_is_visible_from_a_new_connection(migrated: Database) -> None:
    row = _user()
    async with migrated.transaction() as conn:
        await conn.execute(users.insert().values(row))

    async with migrated.connect() as conn:
        found = (await conn.execute(select(users).where(users.c.id == row["id"]))).one()
    assert found.username == "alice"
    assert found.is_admin is False


async def _write_then_fail(db: Database) -> None:
    async with db.transaction() as conn:
        await conn.execute(users.insert().values(_user()))
        await conn.execute(
            outbox.insert().values(
                event_id=str(uuid.uuid4()),
                routing_key="video.deleted",
                payload="{}",
                created_at=datetime.now(UTC),
            )
        )
        raise RuntimeError("boom")


async def test_exception_inside_transaction_rolls_everything_back(migrated: Database) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        await _write_then_fail(migrated)

    async with migrated.connect() as conn:
        assert await _count(conn, users) == 0
        assert await _count(conn, outbox) == 0


async def test_duplicate_username_raises_duplicate_key_error(migrated: Database) -> None:
    async with migrated.transaction() as conn:
        await conn.execute(users.insert().values(_user("alice")))

    with pytest.raises(DuplicateKeyError):
        async with migrated.transaction() as conn:
            await conn.execute(users.insert().values(_user("alice")))

    with pytest.raises(DuplicateKeyError):  # the same name in another case
        async with migrated.transaction() as conn:
            await conn.execute(users.insert().values(_user("Alice")))

    async with migrated.connect() as conn:
        assert await _count(conn, users) == 1


async def test_duplicate_key_leaves_the_transaction_usable(migrated: Database) -> None:
    # How consumers dedupe: insert the message id, and on a duplicate skip the work,
    # still inside the transaction that records everything else.
    seen = {"consumer": "thumbnails", "message_id": "m-1", "processed_at": datetime.now(UTC)}
    async with migrated.transaction() as conn:
        await conn.execute(processed_messages.insert().values(seen))
    async with migrated.transaction() as conn:
        with pytest.raises(DuplicateKeyError), translate_errors():
            await conn.execute(processed_messages.insert().values(seen))
        await conn.execute(processed_messages.insert().values({**seen, "message_id": "m-2"}))

    async with migrated.connect() as conn:
        assert await _count(conn, processed_messages) == 2


async def test_foreign_keys_are_enforced(migrated: Database) -> None:
    now = datetime.now(UTC)
    token = {
        "id": new_id(),
        "family_id": new_id(),
        "user_id": new_id(),  # no such user
        "expires_at": now + timedelta(days=7),
        "created_at": now,
    }
    with pytest.raises(exc.IntegrityError):
        async with migrated.transaction() as conn:
            await conn.execute(refresh_tokens.insert().values(token))


async def test_a_failed_statement_shows_none_of_its_bound_values(migrated: Database) -> None:
    """An unexpected database error is logged with its traceback (shared.web): the values
    bound to the statement (password hashes, refresh-token hashes) are not in it, whichever
    driver raised it (the engines' hide_parameters)."""
    password_hash = "$argon2id$" + secrets.token_hex(16)
    token_hash = secrets.token_hex(32)
    now = datetime.now(UTC)
    async with migrated.transaction() as conn:
        await conn.execute(users.insert().values(_user("alice")))
    with pytest.raises(DuplicateKeyError) as duplicate:
        async with migrated.transaction() as conn:
            await conn.execute(
                users.insert().values({**_user("alice"), "password_hash": password_hash})
            )
    token = {
        "id": token_hash,
        "family_id": new_id(),
        "user_id": new_id(),  # no such user
        "expires_at": now + timedelta(days=7),
        "created_at": now,
    }
    with pytest.raises(exc.IntegrityError) as orphan:
        async with migrated.transaction() as conn:
            await conn.execute(refresh_tokens.insert().values(token))
    for failure in (duplicate.value, orphan.value):
        logged = "".join(traceback.format_exception(failure))  # the causes included
        assert password_hash not in logged
        assert token_hash not in logged


async def test_utc_datetime_round_trips_with_microseconds(migrated: Database) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    written = datetime(2031, 3, 4, 5, 6, 7, 890123, tzinfo=india)
    row = {**_user(), "created_at": written}
    async with migrated.transaction() as conn:
        await conn.execute(users.insert().values(row))

    async with migrated.connect() as conn:
        read = (await conn.execute(select(users.c.created_at))).scalar_one()
    assert read == written
    assert read.tzinfo is UTC
    assert read.microsecond == 890123


async def test_naive_datetime_is_refused(migrated: Database) -> None:
    row = {**_user(), "created_at": datetime(2031, 3, 4, 5, 6, 7)}
    with pytest.raises(exc.StatementError, match="naive datetime"):
        async with migrated.transaction() as conn:
            await conn.execute(users.insert().values(row))


async def test_outbox_ids_autoincrement(migrated: Database) -> None:
    ids = []
    for n in range(3):
        async with migrated.transaction() as conn:
            result = await conn.execute(
                outbox.insert().values(
                    event_id=f"00000000-0000-4000-8000-{n:012d}",
                    routing_key="upload.completed",
                    payload=json.dumps({"n": n}),
                    created_at=datetime.now(UTC),
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            ids.append(key[0])

    assert all(isinstance(i, int) for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    async with migrated.connect() as conn:
        stored = (await conn.execute(select(outbox.c.id).order_by(outbox.c.id))).scalars().all()
    assert list(stored) == ids


async def test_a_bad_statement_is_a_bug_not_an_outage(migrated: Database) -> None:
    with pytest.raises(exc.DBAPIError) as raised:
        async with migrated.connect() as conn:
            await conn.execute(text("SELECT nope FROM users"))
    assert not isinstance(raised.value, DatabaseUnavailableError)


async def test_ping(database: Database) -> None:
    await database.ping()


@pytest.fixture(params=["sqlite", "mysql"])
def unreachable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        # SQLite cannot open a directory as its database file.
        (tmp_path / "vod.db").mkdir()
        return f"sqlite+aiosqlite:///{tmp_path}/vod.db"
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"mysql+aiomysql://root@127.0.0.1:{port}/vod"


async def test_unreachable_database_raises_unavailable_quickly(unreachable_url: str) -> None:
    threads_before = set(threading.enumerate())
    db = await open_database(unreachable_url)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(DatabaseUnavailableError):
                await db.ping()
            with pytest.raises(DatabaseUnavailableError):
                async with db.transaction():
                    pass
    finally:
        await db.close()
    # aiosqlite stops the worker thread of a failed connection without waiting for it, and
    # that thread then reports to this test's event loop: let it finish while the loop is
    # still open, or its "Event loop is closed" error surfaces in whichever test runs next.
    for thread in set(threading.enumerate()) - threads_before:
        await asyncio.to_thread(thread.join, 5)


async def test_sqlite_connections_are_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    db = await open_database("sqlite+aiosqlite:///var/nested/vod.db")
    try:
        async with db.connect() as conn:
            pragmas = {
                name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("foreign_keys", "journal_mode", "busy_timeout")
            }
    finally:
        await db.close()
    assert (tmp_path / "var" / "nested" / "vod.db").is_file()
    assert pragmas == {"foreign_keys": 1, "journal_mode": "wal", "busy_timeout": 5000}


def test_new_ids_are_opaque_sortable_strings() -> None:
    ids = [new_id() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)  # Crockford base32
    assert len(set(ids)) == len(ids)
    assert new_id()[:10] >= max(ids)[:10]  # the time part never goes backwards


# -- read/write split (VOD_DB_READ_URL) ---------------------------------------------------
#
# The "replica" here is a second MariaDB database of the same schema that nothing
# replicates into: a row read from it was put there by the test, so whichever copy a read
# returns proves which server answered it.


@pytest.fixture
def replica_database_url(mysql_database_url: str) -> Iterator[str]:
    """A second, empty database beside the run's own, migrated, dropped at the end."""
    name = f"{urlsplit(mysql_database_url).path.strip('/')}_replica_{secrets.token_hex(3)}"
    with mysql_database(mysql_database_url, name) as url:
        asyncio.run(_migrate(url))
        yield url


async def _migrate(url: str) -> None:
    db = await open_database(url)
    try:
        await db.migrate()
    finally:
        await db.close()


@pytest.fixture
async def split(mysql_database_url: str, replica_database_url: str) -> AsyncIterator[Database]:
    """A migrated, emptied primary with the unreplicated replica beside it."""
    db = await open_database(mysql_database_url, read_url=replica_database_url)
    try:
        async with db.transaction() as conn:
            await conn.run_sync(_drop_every_table)
        await db.migrate()
        yield db
    finally:
        await db.close()


async def _usernames(conn: AsyncConnection) -> set[str]:
    return set((await conn.execute(select(users.c.username))).scalars())


async def test_reader_reads_the_replica_and_writes_go_to_the_primary(split: Database) -> None:
    assert split.has_replica
    async with split.transaction() as conn:
        await conn.execute(users.insert().values(**_user("on_primary")))
    async with split.reader() as conn:
        assert await _usernames(conn) == set()  # nothing replicates: this is the replica
    async with split.connect() as conn:
        assert await _usernames(conn) == {"on_primary"}
    await split.ping_replica()


async def test_reads_on_primary_applies_to_its_own_context_only(split: Database) -> None:
    async with split.transaction() as conn:
        await conn.execute(users.insert().values(**_user("just_written")))
    seen_elsewhere = asyncio.Event()
    other_reads: list[set[str]] = []

    async def another_request() -> None:
        await seen_elsewhere.wait()
        async with split.reader() as conn:
            other_reads.append(await _usernames(conn))

    other = asyncio.create_task(another_request())  # started outside the block
    with reads_on_primary():
        assert not split.reads_go_to_replica()
        async with split.reader() as conn:
            assert await _usernames(conn) == {"just_written"}
        seen_elsewhere.set()
        await other
    assert other_reads == [set()]
    assert split.reads_go_to_replica()


async def test_without_a_replica_reader_is_the_primary(tmp_path: Path) -> None:
    db = await open_database(f"sqlite+aiosqlite:///{tmp_path}/vod.db")
    try:
        await db.migrate()
        assert not db.has_replica
        assert not db.reads_go_to_replica()
        async with db.transaction() as conn:
            await conn.execute(users.insert().values(**_user("solo")))
        async with db.reader() as conn:
            assert await _usernames(conn) == {"solo"}
    finally:
        await db.close()
    with pytest.raises(ValueError, match="MySQL"):
        await open_database(
            f"sqlite+aiosqlite:///{tmp_path}/vod.db", read_url="mysql+aiomysql://r@h/db"
        )


def test_standalone_settings_have_no_replica() -> None:
    settings = Settings.from_env({}, defaults=STANDALONE_DEFAULTS)
    assert settings.db_read_url is None
    with pytest.raises(ConfigError, match="VOD_DB_READ_URL"):
        Settings.from_env(
            {"VOD_DB_READ_URL": "mysql+aiomysql://reader@replica/vod"},
            defaults=STANDALONE_DEFAULTS,
        )


# Tables whose rows make a published video visible, in foreign-key order.
_VIDEO_TABLES = ("users", "blobs", "uploads", "videos")


async def _replicate(primary_url: str, replica_url: str) -> None:
    """What a replica's catching up does: copy the rows the replica lacks."""
    primary, replica = urlsplit(primary_url).path.strip("/"), urlsplit(replica_url).path.strip("/")
    db = await open_database(primary_url)
    try:
        async with db.transaction() as conn:
            for table in _VIDEO_TABLES:
                # Only this run's fixture database names and fixed table names go in.
                source, target = f"`{primary}`.`{table}`", f"`{replica}`.`{table}`"
                copy = f"INSERT IGNORE INTO {target} SELECT * FROM {source}"  # noqa: S608
                await conn.execute(text(copy))
    finally:
        await db.close()


async def test_api_lists_from_the_replica_but_the_owner_reads_their_writes(
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    real_backends_env: dict[str, str],
    replica_database_url: str,
) -> None:
    settings = make_settings(**real_backends_env, VOD_DB_READ_URL=replica_database_url)
    stack = await start_stack(settings, aiohttp_server, aiohttp_client)
    owner_name = f"owner_{secrets.token_hex(3)}"
    owner = Publisher(stack, owner_name, await stack.new_user(owner_name))
    viewer = await stack.new_user()
    video = await owner.video("Replica lag", "a film about catching up")

    async def listed(headers: dict[str, str], **params: str) -> list[str]:
        response = await stack.gateway.get("/api/v1/videos", params=params, headers=headers)
        assert response.status == 200, await response.text()
        return [item["id"] for item in (await response.json())["items"]]

    # The owner just wrote: their reads go to the primary, their video is there at once.
    assert await listed(owner.auth, author=owner_name) == [video["id"]]
    assert await listed(owner.auth, q="catching") == [video["id"]]
    me = await stack.gateway.get("/api/v1/users/me", headers=owner.auth)
    assert me.status == 200
    # Everyone else reads the replica, which has not caught up (nothing replicates here).
    assert await listed({}, author=owner_name) == []
    assert await listed(viewer, q="catching") == []
    assert await listed({}) == []
    # The video itself is read from the primary (its JSON is cached beyond any lag).
    single = await stack.gateway.get(f"/api/v1/videos/{video['id']}")
    assert single.status == 200

    await _replicate(settings.db_url, replica_database_url)
    assert await listed({}, author=owner_name) == [video["id"]]
    assert await listed(viewer, q="catching") == [video["id"]]
    profile = await stack.gateway.get(f"/api/v1/users/{owner_name}")
    assert (await profile.json())["video_count"] == 1
