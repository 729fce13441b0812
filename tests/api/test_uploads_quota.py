"""The per-user bounds checked when an upload starts: the storage quota
(``VOD_USER_QUOTA_BYTES``) and the uploads in progress (``VOD_MAX_UPLOADS_IN_PROGRESS``).

What counts (``stream_service.repositories.quota``): live videos, finished uploads no video
uses yet, uploads in progress. Every test runs on the embedded back ends and on MariaDB and
Redis (the ledger's scripts and the usage query are back-end specific).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from shared.content_hash import content_hash
from shared.db import new_id
from shared.errors import ConfigError
from shared.kv import KeyValueStore, open_kv
from shared.layout import upload_state_key
from shared.resources import BLOBS, DB, KV
from shared.settings import Settings
from stream_service.repositories.quota import QuotaLedger
from stream_service.services.uploads import DEFAULT_CHUNK_SIZE, UploadService
from tests.api.test_tus import TusClient, tus_problem
from tests.clients import Publisher, Uploader, new_upload
from tests.conftest import RUN_ID, mysql_database
from tests.problems import problem
from tests.stack import Stack, start_stack

QUOTA = 25_000
FILE = 10_000
MAX_IN_PROGRESS = 3


@pytest.fixture(scope="module")
def quota_database_url(mysql_server_url: str) -> Iterator[str]:
    """A MariaDB database of this module's own: its tests delete videos, which other
    modules' tests of the run's shared database do not expect to see."""
    with mysql_database(mysql_server_url, f"vod_test_{RUN_ID}_quota") as url:
        yield url


@pytest.fixture(params=["embedded", pytest.param("real", marks=pytest.mark.integration)])
async def quota_stack(
    request: pytest.FixtureRequest,
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Stack]:
    real: dict[str, str] = {}
    if request.param == "real":
        real = request.getfixturevalue("real_backends_env") | {
            "VOD_DB_URL": request.getfixturevalue("quota_database_url")
        }
    settings = make_settings(
        **real,
        VOD_USER_QUOTA_BYTES=str(QUOTA),
        VOD_MAX_UPLOADS_IN_PROGRESS=str(MAX_IN_PROGRESS),
    )
    yield await start_stack(settings, aiohttp_server, aiohttp_client)
    if real:
        kv = await open_kv(settings.redis_url, settings.namespace)
        try:
            await kv.delete_namespace()
        finally:
            await kv.close()


@pytest.fixture
async def alice(quota_stack: Stack) -> Publisher:
    name = f"alice_{os.urandom(3).hex()}"
    return Publisher(quota_stack, name, await quota_stack.new_user(name))


async def test_a_file_larger_than_the_free_space_is_refused_with_what_is_free(
    alice: Publisher,
) -> None:
    body = await problem(
        await alice.uploader.create(new_upload(os.urandom(QUOTA + 1))), 413, "quota_exceeded"
    )
    assert (body["quota_bytes"], body["remaining_bytes"], body["size"]) == (
        QUOTA,
        QUOTA,
        QUOTA + 1,
    )
    # Exactly the quota fits.
    await alice.uploader.start(os.urandom(QUOTA))


async def test_uploads_in_progress_count_until_deleted(alice: Publisher) -> None:
    uploader = alice.uploader
    first = await uploader.start(os.urandom(FILE))
    await uploader.start(os.urandom(FILE))
    body = await problem(await uploader.create(new_upload(os.urandom(FILE))), 413, "quota_exceeded")
    assert body["remaining_bytes"] == QUOTA - 2 * FILE

    assert (await uploader.delete(first["upload_id"])).status == 204
    await uploader.start(os.urandom(FILE))


async def test_finished_uploads_and_videos_count_and_deleting_a_video_frees_its_space(
    alice: Publisher, quota_stack: Stack
) -> None:
    unused = await alice.upload(os.urandom(FILE))
    video = await alice.publish(upload_id=await alice.upload(os.urandom(FILE)))
    assert video.status == 201, await video.text()
    body = await problem(
        await alice.uploader.create(new_upload(os.urandom(FILE))), 413, "quota_exceeded"
    )
    assert body["remaining_bytes"] == QUOTA - 2 * FILE

    # Publishing the unused upload does not count it twice.
    assert (await alice.publish(upload_id=unused)).status == 201
    assert (
        await problem(
            await alice.uploader.create(new_upload(os.urandom(FILE))), 413, "quota_exceeded"
        )
    )["remaining_bytes"] == QUOTA - 2 * FILE

    video_id = (await video.json())["id"]
    deleted = await quota_stack.gateway.delete(f"/api/v1/videos/{video_id}", headers=alice.auth)
    assert deleted.status == 202, await deleted.text()
    await alice.uploader.start(os.urandom(FILE))


async def test_one_users_files_do_not_use_anothers_quota(
    alice: Publisher, quota_stack: Stack
) -> None:
    await alice.uploader.start(os.urandom(QUOTA))
    bob = Uploader(quota_stack, await quota_stack.new_user())
    await bob.start(os.urandom(QUOTA))


async def test_concurrent_starts_cannot_share_the_last_free_bytes(alice: Publisher) -> None:
    size = QUOTA // 2 + 1
    responses = await asyncio.gather(
        *(alice.uploader.create(new_upload(os.urandom(size))) for _ in range(4))
    )
    statuses = sorted(response.status for response in responses)
    assert statuses == [201, 413, 413, 413]


def test_the_quota_is_unlimited_by_default_and_cannot_be_negative(
    make_settings: Callable[..., Settings],
) -> None:
    assert make_settings().user_quota_bytes == 0
    with pytest.raises(ConfigError, match="VOD_USER_QUOTA_BYTES"):
        make_settings(VOD_USER_QUOTA_BYTES="-1")


# -- uploads in progress ---------------------------------------------------------------------


async def test_uploads_in_progress_are_capped_native_and_tus_alike(
    alice: Publisher, quota_stack: Stack
) -> None:
    uploader, tus = alice.uploader, TusClient(quota_stack, alice.auth)

    async def refused() -> None:
        body = await problem(
            await uploader.create(new_upload(os.urandom(100))), 409, "too_many_uploads"
        )
        assert body["max_uploads_in_progress"] == MAX_IN_PROGRESS
        await tus_problem(await tus.create(100), 409, "too_many_uploads")

    deleted = (await uploader.start(os.urandom(100)))["upload_id"]
    data = os.urandom(100)
    completed = (await uploader.start(data))["upload_id"]
    terminated = await tus.start(100)
    await refused()
    # Another user's uploads are theirs.
    await Uploader(quota_stack, await quota_stack.new_user()).start(os.urandom(100))

    # Deleting, completing and terminating each free one place, and only one.
    assert (await uploader.delete(deleted)).status == 204
    await tus.start(100)
    await refused()
    await uploader.put_ok(completed, 0, data)
    assert (await uploader.complete(completed)).status == 200
    await uploader.start(os.urandom(100))
    await refused()
    ended = await quota_stack.gateway.delete(terminated, headers=tus.headers())
    assert ended.status == 204, await ended.text()
    await uploader.start(os.urandom(100))
    await refused()


async def test_concurrent_creates_cannot_pass_the_cap(alice: Publisher) -> None:
    responses = await asyncio.gather(
        *(alice.uploader.create(new_upload(os.urandom(100))) for _ in range(2 * MAX_IN_PROGRESS))
    )
    statuses = sorted(response.status for response in responses)
    assert statuses == [201] * MAX_IN_PROGRESS + [409] * MAX_IN_PROGRESS


async def test_the_running_total_is_exact_after_every_way_an_upload_ends(
    alice: Publisher, quota_stack: Stack
) -> None:
    """Deleted, terminated and instant uploads give back exactly their bytes; completed
    ones move them to what the database counts."""
    uploader, tus = alice.uploader, TusClient(quota_stack, alice.auth)
    stored = os.urandom(FILE)
    await uploader.upload(stored)
    instant = await uploader.create(new_upload(stored))
    assert instant.status == 200, await instant.text()
    created = await instant.json()
    terminated = await tus.start(2_000)
    deleted = (await uploader.start(os.urandom(1_000)))["upload_id"]

    async def free() -> int:
        response = await uploader.create(new_upload(os.urandom(QUOTA)))
        return int((await problem(response, 413, "quota_exceeded"))["remaining_bytes"])

    # At the cap now: the first look is after the first upload ended.
    assert (await uploader.delete(deleted)).status == 204
    assert await free() == QUOTA - 2 * FILE - 2_000
    assert (await quota_stack.gateway.delete(terminated, headers=tus.headers())).status == 204
    assert await free() == QUOTA - 2 * FILE
    offset, length = created["challenge"]["offset"], created["challenge"]["length"]
    proof = hashlib.sha256(stored[offset : offset + length]).hexdigest()
    finished = await uploader.complete(created["upload_id"], {"proof": proof})
    assert finished.status == 200, await finished.text()
    # Now two finished uploads no video uses, in the database; nothing in progress.
    assert await free() == QUOTA - 2 * FILE


async def test_an_upload_finishing_between_the_two_reads_of_a_create_is_counted(
    alice: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create reads the database before the upload is recorded there and reserves
    after the upload left Redis: the upload must still count."""
    uploader = alice.uploader
    data = os.urandom(FILE)
    finishing = (await uploader.start(data))["upload_id"]
    await uploader.put_ok(finishing, 0, data)
    read, go = asyncio.Event(), asyncio.Event()
    stored_bytes = QuotaLedger.stored_bytes

    async def held(self: QuotaLedger, owner_id: str, *, now: Any) -> int:
        used = await stored_bytes(self, owner_id, now=now)
        if not read.is_set():
            read.set()
            await go.wait()
        return used

    monkeypatch.setattr(QuotaLedger, "stored_bytes", held)
    async with asyncio.timeout(30):
        creating = asyncio.create_task(uploader.create(new_upload(os.urandom(QUOTA - FILE + 1))))
        await read.wait()  # the database said 0 bytes: the upload is still in progress
        assert (await uploader.complete(finishing)).status == 200
        go.set()
        body = await problem(await creating, 413, "quota_exceeded")
    assert body["remaining_bytes"] == QUOTA - FILE


async def gone(kv: KeyValueStore, key: str) -> None:
    """Returns once ``key`` has expired (polled for at most 10 s)."""
    for _ in range(1000):
        if not await kv.exists(key):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} did not expire")


async def test_an_expired_upload_no_longer_counts(quota_stack: Stack) -> None:
    app = quota_stack.servers["stream"].app
    service = UploadService(
        db=app[DB],
        kv=app[KV],
        blobs=app[BLOBS],
        max_upload_bytes=QUOTA,
        user_quota_bytes=QUOTA,
        max_uploads_in_progress=1,
        state_ttl=0.2,
    )
    owner, data = new_id(), os.urandom(QUOTA)

    async def create() -> str:
        created = await service.create(
            owner,
            filename="film.mp4",
            size=QUOTA,
            content_hash=content_hash(data),
            chunk_size=DEFAULT_CHUNK_SIZE,
        )
        return created.id

    abandoned = await create()
    await gone(app[KV], upload_state_key(abandoned))
    # Neither its place nor its bytes are held any more.
    await create()


def test_uploads_in_progress_are_20_by_default_and_at_least_1(
    make_settings: Callable[..., Settings],
) -> None:
    assert make_settings().max_uploads_in_progress == 20
    with pytest.raises(ConfigError, match="VOD_MAX_UPLOADS_IN_PROGRESS"):
        make_settings(VOD_MAX_UPLOADS_IN_PROGRESS="0")
