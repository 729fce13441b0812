"""A finished upload nobody published in time: its file collected, the upload expired.

A finished upload holds its file for the collector's grace period (24 h by default).
After that the collector may take the file; from the moment it claims it, the upload
says ``expired`` and publishing it is 410 ``upload_expired``, never a video with no file.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select, update

from api_service.repositories.videos import FinishedUpload, VideoRepository
from scheduler_service.jobs.blob_collector import BlobCollector
from shared.content_hash import content_hash
from shared.db.schema import blobs, videos
from shared.layout import content_blob_key
from shared.resources import BLOBS, DB
from tests.api.test_tus import PATCH_TYPE, TUS_HEADERS
from tests.clients import Publisher
from tests.problems import problem
from tests.stack import Stack


@pytest.fixture(params=["embedded", pytest.param("real", marks=pytest.mark.integration)])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """Every test here runs on the embedded back ends and on MariaDB, Redis, RabbitMQ."""
    stack: Stack = request.getfixturevalue("stack" if request.param == "embedded" else "real_stack")
    return stack


@pytest.fixture
async def alice(any_stack: Stack) -> Publisher:
    # A unique name: the real database is shared by every test of the run.
    name = f"alice_{os.urandom(3).hex()}"
    return Publisher(any_stack, name, await any_stack.new_user(name))


async def collect(stack: Stack, data: bytes) -> bool:
    """The scheduler's collector, taking the file of ``data`` if nothing holds it now."""
    scheduler = stack.servers["scheduler"].app
    collector = BlobCollector(scheduler[DB], scheduler[BLOBS])
    return await collector.collect(content_hash(data), datetime.now(UTC))


async def videos_of_upload(stack: Stack, upload_id: str) -> int:
    async with stack.servers["api"].app[DB].connect() as conn:
        count = await conn.execute(
            select(func.count()).select_from(videos).where(videos.c.upload_id == upload_id)
        )
        return int(count.scalar_one())


async def test_an_upload_whose_file_was_collected_is_expired_and_never_published(
    any_stack: Stack, alice: Publisher
) -> None:
    data = os.urandom(10_000)
    upload_id = await alice.upload(data)
    assert (await alice.uploader.status(upload_id))["state"] == "complete"

    assert await collect(any_stack, data)

    status = await alice.uploader.status(upload_id)
    assert status["state"] == "expired"
    await problem(await alice.publish(upload_id=upload_id), 410, "upload_expired")
    assert await videos_of_upload(any_stack, upload_id) == 0
    # Nothing else can be done with it either.
    await problem(await alice.uploader.complete(upload_id), 410, "upload_expired")
    await problem(await alice.uploader.delete(upload_id), 410, "upload_expired")

    # The way out: upload the file again; that upload publishes and streams.
    again = await alice.upload(data)
    assert again != upload_id
    response = await alice.publish(upload_id=again)
    assert response.status == 201, await response.text()
    video = await response.json()
    stream = await any_stack.gateway.get(video["stream_url"])
    assert stream.status == 200
    assert await stream.read() == data


async def test_publishing_while_the_collector_takes_the_file_is_refused(
    any_stack: Stack, alice: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(10_000)
    upload_id = await alice.upload(data)
    # The api has read the finished upload (still complete) when the collector claims
    # its file: only the blob row, in the publishing transaction, can tell.
    looked_up = asyncio.Event()
    go_on = asyncio.Event()
    lookup = VideoRepository.finished_upload

    async def held_lookup(self: VideoRepository, upload: str) -> FinishedUpload | None:
        found = await lookup(self, upload)
        looked_up.set()
        await go_on.wait()
        return found

    monkeypatch.setattr(VideoRepository, "finished_upload", held_lookup)

    async with asyncio.timeout(30):
        publishing: asyncio.Task[Any] = asyncio.create_task(alice.publish(upload_id=upload_id))
        await looked_up.wait()
        assert await collect(any_stack, data)
        go_on.set()
        response = await publishing

    await problem(response, 410, "upload_expired")
    assert await videos_of_upload(any_stack, upload_id) == 0
    async with any_stack.servers["api"].app[DB].connect() as conn:
        row = await conn.execute(
            select(blobs.c.content_hash).where(blobs.c.content_hash == content_hash(data))
        )
        assert row.first() is None
    assert (await alice.uploader.status(upload_id))["state"] == "expired"


async def test_a_claim_left_by_a_stopped_collector_refuses_publishing_and_is_finished(
    any_stack: Stack, alice: Publisher
) -> None:
    data = os.urandom(10_000)
    upload_id = await alice.upload(data)
    scheduler = any_stack.servers["scheduler"].app
    # A collector claimed the file, then stopped before deleting it.
    async with scheduler[DB].transaction() as conn:
        await conn.execute(
            update(blobs)
            .where(blobs.c.content_hash == content_hash(data))
            .values(collecting_since=datetime.now(UTC))
        )

    await problem(await alice.publish(upload_id=upload_id), 410, "upload_expired")
    assert await videos_of_upload(any_stack, upload_id) == 0

    # The next run finishes the claim (with the default grace, nothing else is due; the
    # scheduler's own timer, had it ticked meanwhile, would have done the same).
    await BlobCollector(scheduler[DB], scheduler[BLOBS]).run()
    assert await scheduler[BLOBS].stat(content_blob_key(content_hash(data))) is None
    assert (await alice.uploader.status(upload_id))["state"] == "expired"


async def test_a_finished_tus_upload_whose_file_was_collected_is_410(
    any_stack: Stack, alice: Publisher
) -> None:
    data = os.urandom(10_000)
    headers = {**TUS_HEADERS, **alice.auth}
    created = await any_stack.gateway.post(
        "/api/v1/tus/",
        data=io.BytesIO(data),
        headers={**headers, **PATCH_TYPE, "Upload-Length": str(len(data))},
    )
    assert created.status == 201, await created.text()
    path = urlsplit(created.headers["Location"]).path
    assert (await any_stack.gateway.head(path, headers=headers)).status == 200

    assert await collect(any_stack, data)

    head = await any_stack.gateway.head(path, headers=headers)
    assert head.status == 410
    assert head.headers["Tus-Resumable"] == "1.0.0"
    await problem(await any_stack.gateway.delete(path, headers=headers), 410, "upload_expired")
    upload_id = path.rsplit("/", 1)[-1]
    await problem(await alice.publish(upload_id=upload_id), 410, "upload_expired")


def test_the_document_lists_the_expired_answers() -> None:
    spec = json.loads((Path(__file__).parents[2] / "gateway" / "openapi.json").read_text())
    for path, method in (
        ("/api/v1/videos", "post"),
        ("/api/v1/uploads/{upload_id}/complete", "post"),
        ("/api/v1/uploads/{upload_id}/chunks/{index}", "put"),
        ("/api/v1/uploads/{upload_id}", "delete"),
        ("/api/v1/tus/{tus_id}", "head"),
        ("/api/v1/tus/{tus_id}", "delete"),
    ):
        assert "410" in spec["paths"][path][method]["responses"], (path, method)
    state = spec["components"]["schemas"]["UploadStatus"]["properties"]["state"]
    assert "expired" in state["enum"]
