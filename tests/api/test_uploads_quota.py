"""The per-user storage quota (``VOD_USER_QUOTA_BYTES``), checked when an upload starts.

What counts (``stream_service.repositories.quota``): live videos, finished uploads no video
uses yet, uploads in progress. Every test runs on the embedded back ends and on MariaDB and
Redis (the reservation script and the usage query are back-end specific).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from shared.errors import ConfigError
from shared.kv import open_kv
from shared.settings import Settings
from tests.clients import Publisher, Uploader, new_upload
from tests.conftest import RUN_ID, mysql_database
from tests.problems import problem
from tests.stack import Stack, start_stack

QUOTA = 25_000
FILE = 10_000


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
    settings = make_settings(**real, VOD_USER_QUOTA_BYTES=str(QUOTA))
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
