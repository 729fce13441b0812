"""Media processing: a real MP4 comes out ready with its duration and a JPEG thumbnail; a
file FFmpeg cannot read comes out failed, and its message is acked, not parked."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from scheduler_service.consumers.media import QUEUE
from scheduler_service.services.media import MediaProcessor
from shared.db.schema import blobs, videos
from shared.layout import video_cache_key
from shared.resources import BLOBS, DB, KV
from tests.api.test_deletions import Settled
from tests.clients import Publisher
from tests.media_files import NOT_MEDIA, tiny_mp4


async def test_a_video_file_gets_its_duration_and_thumbnail(stack: Any) -> None:
    scheduler = stack.servers["scheduler"].app
    settled = Settled(scheduler, QUEUE)
    owner = Publisher(stack, "owner", await stack.new_user())
    upload_id = await owner.upload(tiny_mp4())
    await settled.until(lambda r: any(o.result == "acked" for o in r))

    # Published after processing finished: ready from the start.
    video = await (await owner.publish(upload_id=upload_id)).json()

    assert video["status"] == "ready"
    assert video["duration_ms"] == 2000
    assert video["thumbnail_url"] == f"/api/v1/videos/{video['id']}/thumbnail"
    thumbnail = await stack.gateway.get(video["thumbnail_url"])
    assert thumbnail.status == 200
    body = await thumbnail.read()
    assert body[:3] == b"\xff\xd8\xff"  # a JPEG

    # Processing that finishes after publishing updates the video and drops its cache.
    async with scheduler[DB].transaction() as conn:
        await conn.execute(update(videos).values(status="processing", duration_ms=None))
        await conn.execute(update(blobs).values(media_status=None))
    await scheduler[KV].set(video_cache_key(video["id"]), "{}")
    processor = MediaProcessor(scheduler[DB], scheduler[KV], scheduler[BLOBS])
    info = await processor.process(video["content_hash"])

    assert info is not None
    assert info.status == "ready"
    assert await scheduler[KV].get(video_cache_key(video["id"])) is None
    again = await (await stack.gateway.get(f"/api/v1/videos/{video['id']}")).json()
    assert (again["status"], again["duration_ms"]) == ("ready", 2000)


async def test_a_file_that_is_not_media_marks_the_video_failed(stack: Any) -> None:
    scheduler = stack.servers["scheduler"].app
    settled = Settled(scheduler, QUEUE)
    owner = Publisher(stack, "owner", await stack.new_user())
    video = await (await owner.publish(upload_id=await owner.upload(NOT_MEDIA))).json()
    await settled.until(bool)

    assert [o.result for o in settled.results] == ["acked"]
    found = await (await stack.gateway.get(f"/api/v1/videos/{video['id']}")).json()
    assert found["status"] == "failed"
    assert "decode" in found["failure_reason"]
    assert found["thumbnail_url"] is None
    assert (await stack.gateway.get(f"/api/v1/videos/{video['id']}/thumbnail")).status == 404
