"""``video.deleted`` → a ``video_deletions`` row, then the deletion runner.

Subscribed raw (``register_raw``): the record and the message id commit together, and
the steps run after that commit, each in its own transaction. When a step fails the
message is retried with the bus's delays; the retry finds its id recorded, skips the
insert and resumes the steps where the record says they stopped. If the message ends up
parked, the periodic ``resume_pending`` job still finishes the deletion.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from scheduler_service.consumers.base import Backends, ConsumerGroup, record_processed
from scheduler_service.jobs.blob_collector import BlobCollector
from scheduler_service.services.deletions import VideoDeletionRunner
from shared.bus import Event, PermanentError
from shared.db import Database
from shared.db.schema import videos
from shared.events import VIDEO_DELETED
from shared.layout import content_blob_key

QUEUE = "video-deletions"
MAX_ID_CHARS = 26


def parse_deletion(data: dict[str, Any]) -> tuple[str, str]:
    """(video id, content hash) of a ``video.deleted`` payload; ``PermanentError`` if bad."""
    video_id = data.get("video_id")
    content_hash = data.get("content_hash")
    if not isinstance(video_id, str) or not video_id.isalnum() or len(video_id) > MAX_ID_CHARS:
        raise PermanentError(f"video.deleted without a valid video_id: {video_id!r}")
    try:
        content_blob_key(content_hash if isinstance(content_hash, str) else "")
    except ValueError:
        raise PermanentError(
            f"video.deleted without a valid content_hash: {content_hash!r}"
        ) from None
    assert isinstance(content_hash, str)  # noqa: S101 - checked just above
    return video_id, content_hash


class VideoDeletedConsumer:
    def __init__(self, db: Database, runner: VideoDeletionRunner) -> None:
        self._db = db
        self._runner = runner

    async def handle(self, event: Event) -> None:
        video_id, content_hash = parse_deletion(event.data)
        async with self._db.transaction() as conn:
            if await record_processed(conn, QUEUE, event.id):
                row = (
                    await conn.execute(select(videos.c.deleted_at).where(videos.c.id == video_id))
                ).first()
                if row is not None and row.deleted_at is None:
                    # Deleting a live video's comments on a stray event would be a loss.
                    raise PermanentError(f"video {video_id} is not soft-deleted")
                await self._runner.deletions.add(
                    conn, video_id=video_id, content_hash=content_hash, now=datetime.now(UTC)
                )
        await self._runner.run(video_id)


def register(group: ConsumerGroup, backends: Backends) -> None:
    collector = BlobCollector(backends.db, backends.blobs, grace=backends.blob_grace)
    runner = VideoDeletionRunner(backends.db, backends.kv, collector)
    group.register_raw(QUEUE, [VIDEO_DELETED], VideoDeletedConsumer(backends.db, runner).handle)
