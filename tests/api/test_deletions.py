"""Deleting a video: the record, each step once in effect, the blob's reference released."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from scheduler_service.consumers.deletions import QUEUE
from scheduler_service.jobs.blob_collector import BlobCollector
from scheduler_service.keys import CONSUMER_GROUP
from scheduler_service.services.deletions import STEPS, VideoDeletionRunner
from shared.bus import Outcome
from shared.layout import (
    MAX_DANMAKU_OFFSET_MS,
    content_blob_key,
    danmaku_bucket_key,
    danmaku_bucket_keys,
    danmaku_bucket_of,
    thumbnail_key,
    video_cache_key,
)
from shared.resources import BLOBS, DB, KV
from tests.clients import Publisher
from tests.media_files import NOT_MEDIA

WAIT = 10.0


class Settled:
    """Futures resolved when a queue settles a message for a given event."""

    def __init__(self, app: Any, queue: str) -> None:
        self.queue = queue
        self.results: list[Outcome] = []
        self.changed = asyncio.Event()
        app[CONSUMER_GROUP].add_outcome_listener(self.outcome)

    def outcome(self, outcome: Outcome) -> None:
        if outcome.queue == self.queue:
            self.results.append(outcome)
            self.changed.set()

    async def until(self, predicate: Callable[[list[Outcome]], bool]) -> None:
        async def wait() -> None:
            while not predicate(self.results):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), WAIT)


async def _blob(app: Any, content_hash: str) -> Any:
    from shared.db.schema import blobs

    async with app[DB].connect() as conn:
        return (
            await conn.execute(select(blobs).where(blobs.c.content_hash == content_hash))
        ).first()


async def test_a_deleted_video_is_removed_and_its_blob_released(stack: Any) -> None:
    scheduler = stack.servers["scheduler"].app
    settled = Settled(scheduler, QUEUE)
    owner = Publisher(stack, "owner", await stack.new_user())
    upload_id = await owner.upload(NOT_MEDIA + b"deletion")
    first = await (await owner.publish(upload_id=upload_id)).json()
    # A second video of the same file (an instant upload of the same bytes).
    second_upload = await owner.upload(NOT_MEDIA + b"deletion")
    second = await (await owner.publish(upload_id=second_upload)).json()
    assert (await _blob(scheduler, first["content_hash"])).ref_count == 2
    comment = await stack.gateway.post(
        f"/api/v1/videos/{first['id']}/comments", json={"content": "first!"}, headers=owner.auth
    )
    assert comment.status == 201
    await scheduler[KV].set(video_cache_key(first["id"]), "{}")

    response = await stack.gateway.delete(f"/api/v1/videos/{first['id']}", headers=owner.auth)
    assert response.status == 202
    await settled.until(lambda r: any(o.result == "acked" for o in r))

    from shared.db.schema import comments, video_deletions, videos

    async with scheduler[DB].connect() as conn:
        left = await conn.execute(select(comments).where(comments.c.video_id == first["id"]))
        assert left.first() is None
        assert (
            await conn.execute(select(videos).where(videos.c.id == first["id"]))
        ).first() is None
        record = (
            await conn.execute(
                select(video_deletions).where(video_deletions.c.video_id == first["id"])
            )
        ).first()
    assert record.state == "done"
    assert record.steps_done.split(",") == list(STEPS)
    assert record.finished_at is not None
    blob = await _blob(scheduler, first["content_hash"])
    assert (blob.ref_count, blob.zero_since) == (1, None)
    assert await scheduler[KV].get(video_cache_key(first["id"])) is None

    # The last video of the file: the reference count reaches 0 and the clock starts.
    response = await stack.gateway.delete(f"/api/v1/videos/{second['id']}", headers=owner.auth)
    assert response.status == 202
    await settled.until(lambda r: sum(o.result == "acked" for o in r) == 2)
    blob = await _blob(scheduler, first["content_hash"])
    assert blob.ref_count == 0
    assert blob.zero_since is not None
    assert (await stack.gateway.get(f"/api/v1/videos/{second['id']}")).status == 404


async def test_running_a_deletion_again_or_twice_at_once_counts_the_video_once(
    stack: Any,
) -> None:
    scheduler = stack.servers["scheduler"].app
    settled = Settled(scheduler, QUEUE)
    owner = Publisher(stack, "owner", await stack.new_user())
    data = NOT_MEDIA + b"twice"
    videos_ = [
        await (await owner.publish(upload_id=await owner.upload(data))).json() for _ in range(2)
    ]
    doomed = videos_[0]
    # Stop the consumer from racing us: take the deletion into our own hands after the
    # record exists, by resetting it to "nothing done" once the consumer finished.
    await stack.gateway.delete(f"/api/v1/videos/{doomed['id']}", headers=owner.auth)
    await settled.until(lambda r: any(o.result == "acked" for o in r))
    from shared.db.schema import video_deletions

    async with scheduler[DB].transaction() as conn:
        await conn.execute(
            update(video_deletions)
            .where(video_deletions.c.video_id == doomed["id"])
            .values(state="pending", steps_done="", finished_at=None)
        )
    collector = BlobCollector(scheduler[DB], scheduler[BLOBS])
    runners = [VideoDeletionRunner(scheduler[DB], scheduler[KV], collector) for _ in range(2)]

    records = await asyncio.gather(*(r.run(doomed["id"]) for r in runners))

    assert all(record is not None and record.state == "done" for record in records)
    # The other video still holds the file: a repeat must not take its reference too.
    assert (await _blob(scheduler, doomed["content_hash"])).ref_count == 1


async def test_with_no_grace_the_file_and_thumbnail_go_with_the_last_video(
    stack: Any,
) -> None:
    scheduler = stack.servers["scheduler"].app
    settled = Settled(scheduler, QUEUE)
    owner = Publisher(stack, "owner", await stack.new_user())
    video = await owner.video()
    content_hash = video["content_hash"]
    await stack.gateway.delete(f"/api/v1/videos/{video['id']}", headers=owner.auth)
    await settled.until(lambda r: any(o.result == "acked" for o in r))
    blobs = scheduler[BLOBS]
    assert await blobs.stat(content_blob_key(content_hash)) is not None  # kept for the grace

    # What the collector does once the grace is over, here with a grace of 0: the row
    # went to 0 references above, so a deletion run now removes the file at once.
    from shared.db.schema import video_deletions

    async with scheduler[DB].transaction() as conn:
        await conn.execute(
            update(video_deletions)
            .where(video_deletions.c.video_id == video["id"])
            .values(state="pending", steps_done="comments,danmaku,video")
        )
    runner = VideoDeletionRunner(
        scheduler[DB], scheduler[KV], BlobCollector(scheduler[DB], blobs, grace=timedelta(0))
    )
    record = await runner.run(video["id"])

    assert record is not None
    assert record.state == "done"
    assert await blobs.stat(content_blob_key(content_hash)) is None
    assert await blobs.stat(thumbnail_key(content_hash)) is None
    assert await _blob(scheduler, content_hash) is None


async def test_a_stalled_deletion_is_resumed_by_the_timer(stack: Any) -> None:
    scheduler = stack.servers["scheduler"].app
    settled = Settled(scheduler, QUEUE)
    owner = Publisher(stack, "owner", await stack.new_user())
    video = await owner.video()
    await stack.gateway.delete(f"/api/v1/videos/{video['id']}", headers=owner.auth)
    await settled.until(lambda r: any(o.result == "acked" for o in r))
    from shared.db.schema import video_deletions

    long_ago = datetime.now(UTC) - timedelta(hours=1)
    async with scheduler[DB].transaction() as conn:
        await conn.execute(
            update(video_deletions)
            .where(video_deletions.c.video_id == video["id"])
            .values(state="pending", steps_done="comments", updated_at=long_ago)
        )
    runner = VideoDeletionRunner(
        scheduler[DB], scheduler[KV], BlobCollector(scheduler[DB], scheduler[BLOBS])
    )

    assert await runner.resume_pending(stale_after=timedelta(minutes=5)) == 1
    assert await runner.resume_pending(stale_after=timedelta(minutes=5)) == 0


async def _send_danmaku(stack: Any, who: Publisher, video_id: str, offset_ms: int) -> None:
    response = await stack.gateway.post(
        f"/api/v1/videos/{video_id}/danmaku",
        json={"offset_ms": offset_ms, "content": "bye", "mode": "scroll", "color": "#ffffff"},
        headers=who.auth,
    )
    assert response.status == 201, await response.text()


async def test_a_deleted_videos_danmaku_leave_redis_and_a_repeat_is_harmless(
    stack: Any,
) -> None:
    scheduler = stack.servers["scheduler"].app
    kv = scheduler[KV]
    settled = Settled(scheduler, QUEUE)
    owner = Publisher(stack, "owner", await stack.new_user())
    doomed, kept = await owner.video(), await owner.video()
    # The first bucket and the very last one a danmaku can reach (a 24 h offset).
    last_bucket = danmaku_bucket_of(MAX_DANMAKU_OFFSET_MS)
    for video in (doomed, kept):
        for offset in (5, MAX_DANMAKU_OFFSET_MS):
            await _send_danmaku(stack, owner, video["id"], offset)
    for video in (doomed, kept):
        for bucket in (0, last_bucket):
            assert await kv.exists(danmaku_bucket_key(video["id"], bucket))

    await stack.gateway.delete(f"/api/v1/videos/{doomed['id']}", headers=owner.auth)
    await settled.until(lambda r: any(o.result == "acked" for o in r))

    assert not [k for k in danmaku_bucket_keys(doomed["id"]) if await kv.exists(k)]
    for bucket in (0, last_bucket):
        assert await kv.exists(danmaku_bucket_key(kept["id"], bucket))

    # A runner that crashed after clearing Redis but before recording it runs the step
    # again: nothing left to delete is not an error, and the record finishes.
    from shared.db.schema import video_deletions

    async with scheduler[DB].transaction() as conn:
        await conn.execute(
            update(video_deletions)
            .where(video_deletions.c.video_id == doomed["id"])
            .values(state="pending", steps_done=",".join(STEPS[:-1]), finished_at=None)
        )
    runner = VideoDeletionRunner(
        scheduler[DB], scheduler[KV], BlobCollector(scheduler[DB], scheduler[BLOBS])
    )
    record = await runner.run(doomed["id"])

    assert record is not None
    assert (record.state, record.steps_done) == ("done", STEPS)
    assert await kv.exists(danmaku_bucket_key(kept["id"], 0))


async def test_a_video_with_more_comments_than_a_batch_is_deleted_batch_by_batch(
    stack: Any,
) -> None:
    scheduler = stack.servers["scheduler"].app
    owner = Publisher(stack, "owner", await stack.new_user())
    video = await owner.video()
    for n in range(5):
        response = await stack.gateway.post(
            f"/api/v1/videos/{video['id']}/comments", json={"content": f"c{n}"}, headers=owner.auth
        )
        assert response.status == 201
    # Soft-deleted and recorded by hand (no event), so only this runner works on it.
    from shared.db.schema import comments, videos

    runner = VideoDeletionRunner(
        scheduler[DB],
        scheduler[KV],
        BlobCollector(scheduler[DB], scheduler[BLOBS]),
        batch_size=2,
    )
    async with scheduler[DB].transaction() as conn:
        await conn.execute(
            update(videos).where(videos.c.id == video["id"]).values(deleted_at=datetime.now(UTC))
        )
        await runner.deletions.add(
            conn, video_id=video["id"], content_hash=video["content_hash"], now=datetime.now(UTC)
        )

    record = await runner.run(video["id"])

    assert record is not None
    assert (record.state, record.steps_done) == ("done", STEPS)
    async with scheduler[DB].connect() as conn:
        left = await conn.execute(select(comments).where(comments.c.video_id == video["id"]))
        assert left.first() is None
        assert (
            await conn.execute(select(videos).where(videos.c.id == video["id"]))
        ).first() is None
    assert (await _blob(scheduler, video["content_hash"])).ref_count == 0
