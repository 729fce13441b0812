"""The blob collector and a completing upload of the same bytes, on the real MariaDB.

The collector is held just before it deletes the stored file (after it has claimed the
blob and its finished uploads have expired); an upload of those bytes then completes,
either the long way (its chunks sent and hashed, the file found stored: dedup writes
nothing) or as an instant upload (a proof read from the stored file). Whatever the order,
no blob row and no finished upload may be left pointing at a missing file.

A stream_service app serves the uploads; the collector runs beside it with a database
and a blob store of its own, as the scheduler does in its own process. Each test waits
until the completion is blocked on the blob row's lock (MariaDB reports it in
``information_schema.INNODB_TRX``) or has finished, before the collector goes on: so the
completion really lands in the collector's window.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select, text, update

from scheduler_service.jobs.blob_collector import BlobCollector
from shared.auth import Identity
from shared.blobs import BlobStore, open_blob_store
from shared.content_hash import content_hash
from shared.db import Database, new_id, open_database
from shared.db.schema import blobs, uploads
from shared.kv import open_kv
from shared.layout import content_blob_key
from shared.resources import BLOBS
from shared.settings import Settings
from stream_service.app import create_app
from stream_service.keys import UPLOADS
from tests.integration.test_uploads_real import put_chunk
from tests.problems import problem

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
CHUNK = 8 * MIB
GRACE = timedelta(hours=24)
Client = TestClient[web.Request, web.Application]

# Transactions of this test's database waiting for a row lock.
INNODB_TRX_IDLE = 0.2
LOCK_WAITS = text(
    "SELECT COUNT(*) FROM information_schema.INNODB_TRX AS t "
    "JOIN information_schema.PROCESSLIST AS p ON p.ID = t.trx_mysql_thread_id "
    "WHERE t.trx_state = 'LOCK WAIT' AND p.DB = DATABASE()"
)


@pytest.fixture
def settings(make_settings: Callable[..., Settings], real_backends_env: dict[str, str]) -> Settings:
    return make_settings(**real_backends_env)


@pytest.fixture
async def stream(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Client]:
    client: Client = await aiohttp_client(create_app(settings))
    yield client
    await client.app[UPLOADS].settled()
    kv = await open_kv(settings.redis_url, settings.namespace)
    try:
        await kv.delete_namespace()
    finally:
        await kv.close()


@pytest.fixture
async def db(settings: Settings, stream: Client) -> AsyncIterator[Database]:
    """The collector's database (the stream app has migrated it)."""
    database = await open_database(settings.db_url)
    yield database
    await database.close()


@pytest.fixture
async def collector_blobs(settings: Settings) -> AsyncIterator[BlobStore]:
    store = open_blob_store(settings.blob_url)
    yield store
    await store.close()


def user_headers(internal_headers: dict[str, str]) -> dict[str, str]:
    user = Identity(
        user_id=new_id(), username="uploader", token_id="t", family_id="f", expires_at=0
    )
    return {**internal_headers, **user.to_headers()}


class HeldDelete:
    """Holds the store's deletion of ``key`` until ``opened``; ``reached`` once it waits."""

    def __init__(self, store: BlobStore, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()
        self._key = key
        self._delete = store.delete
        monkeypatch.setattr(store, "delete", self.delete)

    async def delete(self, key: str) -> bool:
        if key == self._key:
            self.reached.set()
            await self.opened.wait()
        return await self._delete(key)


async def start(client: Client, headers: dict[str, str], data: bytes) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/uploads",
        json={"filename": "film.mp4", "size": len(data), "content_hash": content_hash(data)},
        headers=headers,
    )
    assert response.status in (200, 201), await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def send_chunks(client: Client, headers: dict[str, str], upload_id: str, data: bytes) -> None:
    for index in range(0, -(-len(data) // CHUNK)):
        chunk = data[index * CHUNK : (index + 1) * CHUNK]
        assert await put_chunk(client, headers, upload_id, index, chunk) == 204


async def complete(
    client: Client, headers: dict[str, str], upload_id: str, proof: str | None = None
) -> Any:
    return await client.post(
        f"/api/v1/uploads/{upload_id}/complete",
        json={"proof": proof} if proof else None,
        headers=headers,
    )


async def finished_unused_long_ago(
    client: Client, headers: dict[str, str], db: Database, data: bytes
) -> str:
    """An upload of ``data`` finished, never published, its blob unreferenced past the
    grace: the collector's to take. Its id."""
    upload_id: str = (await start(client, headers, data))["upload_id"]
    await send_chunks(client, headers, upload_id, data)
    assert (await complete(client, headers, upload_id)).status == 200
    async with db.transaction() as conn:
        await conn.execute(
            update(blobs)
            .where(blobs.c.content_hash == content_hash(data))
            .values(zero_since=datetime.now(UTC) - 2 * GRACE)
        )
    return upload_id


async def blocked_or_done(db: Database, task: asyncio.Task[Any]) -> bool:
    """Waits until ``task`` is blocked on a row lock (True) or has finished (False)."""
    async with asyncio.timeout(30):
        while not task.done():
            async with db.connect() as conn:
                if (await conn.execute(LOCK_WAITS)).scalar_one():
                    return True
            # Longer than the 0.1 s for which InnoDB serves INNODB_TRX from a cache after
            # each read: a faster poll keeps reading the cache made before the wait began.
            await asyncio.wait({task}, timeout=INNODB_TRX_IDLE)
    return False


async def stored_bytes(store: BlobStore, key: str) -> bytes | None:
    if await store.stat(key) is None:
        return None
    return b"".join([piece async for piece in store.read(key)])


async def blob_row(db: Database, digest: str) -> Any:
    async with db.connect() as conn:
        return (await conn.execute(select(blobs).where(blobs.c.content_hash == digest))).first()


async def upload_state(db: Database, upload_id: str) -> str | None:
    async with db.connect() as conn:
        state: str | None = (
            await conn.execute(select(uploads.c.state).where(uploads.c.id == upload_id))
        ).scalar()
        return state


async def test_a_dedup_completion_in_the_collectors_window_keeps_its_file(
    stream: Client,
    db: Database,
    collector_blobs: BlobStore,
    internal_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(CHUNK + 1000)
    digest, key = content_hash(data), content_blob_key(content_hash(data))
    first, second = user_headers(internal_headers), user_headers(internal_headers)
    old_upload = await finished_unused_long_ago(stream, first, db, data)
    # The same bytes again, sent the long way: the file is stored, so completion only
    # hashes the chunks and writes nothing.
    upload_id = (await start(stream, second, data))["upload_id"]
    await send_chunks(stream, second, upload_id, data)
    held = HeldDelete(collector_blobs, key, monkeypatch)
    collector = BlobCollector(db, collector_blobs, grace=GRACE)

    async with asyncio.timeout(60):
        collecting = asyncio.create_task(collector.collect(digest, datetime.now(UTC) - GRACE))
        await held.reached.wait()  # claimed, about to delete the file
        completing = asyncio.create_task(complete(stream, second, upload_id))
        waited = await blocked_or_done(db, completing)
        held.opened.set()
        collected, response = await asyncio.gather(collecting, completing)

    assert response.status == 200, await response.text()
    assert (await response.json())["state"] == "complete"
    assert collected  # the old file went...
    # ...and the completion stored it again: its row and its upload point at the bytes.
    assert await stored_bytes(stream.app[BLOBS], key) == data
    row = await blob_row(db, digest)
    assert row is not None
    assert row.collecting_since is None
    assert await upload_state(db, upload_id) == "complete"
    # The upload nobody published in time is expired, and says so.
    assert await upload_state(db, old_upload) == "expired"
    status = await stream.get(f"/api/v1/uploads/{old_upload}", headers=first)
    assert (await status.json())["state"] == "expired"
    assert waited  # the completion did land in the window: it waited for the row's lock


async def test_an_instant_proof_in_the_collectors_window_is_refused_and_records_nothing(
    stream: Client,
    db: Database,
    collector_blobs: BlobStore,
    internal_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(CHUNK + 1000)
    digest, key = content_hash(data), content_blob_key(content_hash(data))
    first, second = user_headers(internal_headers), user_headers(internal_headers)
    await finished_unused_long_ago(stream, first, db, data)
    instant = await start(stream, second, data)
    assert instant["instant"] is True
    offset, length = instant["challenge"]["offset"], instant["challenge"]["length"]
    proof = hashlib.sha256(data[offset : offset + length]).hexdigest()
    upload_id = instant["upload_id"]
    held = HeldDelete(collector_blobs, key, monkeypatch)
    collector = BlobCollector(db, collector_blobs, grace=GRACE)

    async with asyncio.timeout(60):
        collecting = asyncio.create_task(collector.collect(digest, datetime.now(UTC) - GRACE))
        await held.reached.wait()
        # The proof is read from the file, which is still there.
        completing = asyncio.create_task(complete(stream, second, upload_id, proof))
        waited = await blocked_or_done(db, completing)
        held.opened.set()
        collected, response = await asyncio.gather(collecting, completing)

    # The file is gone: the bytes must come the long way, and nothing claims them.
    await problem(response, 409, "instant_unavailable")
    assert collected
    assert await blob_row(db, digest) is None
    assert await upload_state(db, upload_id) is None
    assert waited

    # Sending the chunks finishes the same upload, with its file stored.
    await send_chunks(stream, second, upload_id, data)
    finished = await complete(stream, second, upload_id)
    assert finished.status == 200, await finished.text()
    assert (await finished.json())["instant"] is False
    assert await stored_bytes(stream.app[BLOBS], key) == data
    assert await blob_row(db, digest) is not None


async def test_a_completion_holding_the_row_first_keeps_the_file_from_the_collector(
    stream: Client,
    db: Database,
    collector_blobs: BlobStore,
    internal_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The other order: the completion has locked the blob row (its grace restarted, not
    # committed yet) when the collector comes to claim the file.
    data = os.urandom(CHUNK + 1000)
    digest, key = content_hash(data), content_blob_key(content_hash(data))
    first, second = user_headers(internal_headers), user_headers(internal_headers)
    old_upload = await finished_unused_long_ago(stream, first, db, data)
    upload_id = (await start(stream, second, data))["upload_id"]
    await send_chunks(stream, second, upload_id, data)
    service = stream.app[UPLOADS]
    is_stored = service._is_stored
    locked = asyncio.Event()
    go_on = asyncio.Event()

    async def held_is_stored(upload: Any) -> bool:
        locked.set()  # called under the row's lock, inside the recording transaction
        await go_on.wait()
        return await is_stored(upload)

    monkeypatch.setattr(service, "_is_stored", held_is_stored)
    collector = BlobCollector(db, collector_blobs, grace=GRACE)

    async with asyncio.timeout(60):
        completing = asyncio.create_task(complete(stream, second, upload_id))
        await locked.wait()
        collecting = asyncio.create_task(collector.collect(digest, datetime.now(UTC) - GRACE))
        waited = await blocked_or_done(db, collecting)
        go_on.set()
        response, collected = await asyncio.gather(completing, collecting)

    assert response.status == 200, await response.text()
    assert not collected
    assert await stored_bytes(stream.app[BLOBS], key) == data
    row = await blob_row(db, digest)
    assert (row.ref_count, row.collecting_since) == (0, None)
    assert row.zero_since > datetime.now(UTC) - GRACE
    # Nothing was claimed, so the earlier upload is still publishable.
    assert await upload_state(db, old_upload) == "complete"
    assert waited  # the collector did come while the completion held the row
