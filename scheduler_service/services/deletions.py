"""Deleting a video for good, step by step, resumable after any crash.

The api soft-deletes a video and queues ``video.deleted``; the consumer records a
``video_deletions`` row and hands the video to ``VideoDeletionRunner.run``, which does, in
order, each step once in effect and records it in the row (``steps_done``):

1. ``comments``  its comments, in batches (each batch its own transaction);
2. ``danmaku``   its persisted danmaku, the same way;
3. ``video``     the video row and, in the same transaction, one reference off its blob
   (``ref_count - 1``; ``zero_since`` set when it reaches 0). The row's deletion guards
   the decrement: only the transaction that really deleted the row decrements, so a
   repeat (or a second runner) can never count a video twice;
4. ``blob``      hands the file to the blob collector: ``BlobCollector.collect`` with the
   collector's own grace. With the production grace (24 h) this removes nothing now; the
   periodic collector deletes the row, the file and its thumbnail once the blob stayed
   unreferenced for the grace period (a re-upload or a new video of the same content in
   that time keeps it, and no upload completing right now can lose its file). With a grace
   of 0 the file goes at once;
5. ``cache``     the Redis cache keys of the video (api JSON and stream view).

Database steps record themselves in the transaction that does the work, conditionally on
the steps read before (``DeletionRepository.mark_step``): a second runner on the same video
blocks on the row, then finds it advanced and stops. Steps outside the database (files,
cache) are safe to repeat, and are recorded after they are done.

Comments and danmaku arrive with their own migration: a table missing from
``shared.db.schema`` has nothing to delete, and its step is recorded as done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Table, case, delete, select, update

from scheduler_service.jobs.blob_collector import BlobCollector
from scheduler_service.repositories.deletions import DONE, DeletionRecord, DeletionRepository
from shared.db import Database
from shared.db.schema import blobs, metadata, videos
from shared.kv import KeyValueStore
from shared.layout import stream_cache_key, video_cache_key

logger = logging.getLogger(__name__)

STEPS: tuple[str, ...] = ("comments", "danmaku", "video", "blob", "cache")
# Tables holding rows of a video (column ``video_id``), emptied before the video row goes.
CHILD_TABLES: dict[str, str] = {"comments": "comments", "danmaku": "danmaku"}
DEFAULT_BATCH_SIZE = 1000
DEFAULT_STALE_AFTER = timedelta(minutes=5)
# A runner that keeps losing races on one record is looping on a bug, not progressing.
MAX_RACES = 20


class DeletionRaceError(Exception):
    """Another runner advanced the record first; this step's transaction rolls back."""


class VideoDeletionRunner:
    def __init__(
        self,
        db: Database,
        kv: KeyValueStore,
        collector: BlobCollector,
        *,
        repository: DeletionRepository | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._kv = kv
        self._collector = collector
        self._deletions = repository or DeletionRepository(db)
        self._batch_size = batch_size
        self._clock = clock

    @property
    def deletions(self) -> DeletionRepository:
        return self._deletions

    async def run(self, video_id: str) -> DeletionRecord | None:
        """Do every step not done yet; returns the finished record (None if unknown).

        Raises what a step raised (after noting it on the record): the caller retries.
        """
        races = 0
        while True:
            record = await self._deletions.get(video_id)
            if record is None or record.state == DONE:
                return record
            step = next((s for s in STEPS if s not in record.steps_done), None)
            if step is None:
                await self._deletions.finish(video_id, self._clock())
                logger.info("video %s deleted", video_id, extra={"video_id": video_id})
                continue
            try:
                await self._do(record, step)
            except DeletionRaceError:
                races += 1
                if races > MAX_RACES:
                    raise
            except Exception as exc:
                await self._note_failure(video_id, f"{step}: {type(exc).__name__}: {exc}")
                raise

    async def resume_pending(self, *, stale_after: timedelta = DEFAULT_STALE_AFTER) -> int:
        """Finish deletions nobody advanced for ``stale_after`` (their message was parked,
        or their scheduler died); returns how many it finished. A periodic job."""
        finished = 0
        ids = await self._deletions.pending(
            updated_before=self._clock() - stale_after, limit=self._batch_size
        )
        for video_id in ids:
            try:
                record = await self.run(video_id)
            except Exception:
                logger.exception("resuming the deletion of video %s failed", video_id)
                continue
            if record is not None and record.state == DONE:
                finished += 1
        return finished

    async def _do(self, record: DeletionRecord, step: str) -> None:
        if step in CHILD_TABLES:
            table = metadata.tables.get(CHILD_TABLES[step])
            if table is not None and "video_id" in table.c:
                await self._delete_children(record, step, table)
            else:
                await self._mark(record, step)
        elif step == "video":
            await self._delete_video(record)
        elif step == "blob":
            await self._collector.collect(
                record.content_hash, self._clock() - self._collector.grace
            )
            await self._mark(record, step)
        elif step == "cache":
            await self._kv.delete(
                video_cache_key(record.video_id), stream_cache_key(record.video_id)
            )
            await self._mark(record, step)
        else:  # pragma: no cover - STEPS and this dispatch are edited together
            raise AssertionError(f"unknown deletion step {step!r}")

    async def _delete_children(self, record: DeletionRecord, step: str, table: Table) -> None:
        """One batch per transaction, so a video with a million danmaku never holds one
        long transaction; the step is recorded with the batch that finds the last rows."""
        key = next(iter(table.primary_key.columns))
        async with self._db.transaction() as conn:
            ids = [
                row[0]
                for row in await conn.execute(
                    select(key).where(table.c.video_id == record.video_id).limit(self._batch_size)
                )
            ]
            if ids:
                await conn.execute(delete(table).where(key.in_(ids)))
            if len(ids) < self._batch_size and not await self._deletions.mark_step(
                conn, record, step, self._clock()
            ):
                raise DeletionRaceError(record.video_id)

    async def _delete_video(self, record: DeletionRecord) -> None:
        now = self._clock()
        async with self._db.transaction() as conn:
            # First: the record's row lock makes a concurrent runner wait, then miss.
            if not await self._deletions.mark_step(conn, record, "video", now):
                raise DeletionRaceError(record.video_id)
            deleted = await conn.execute(
                delete(videos).where(
                    videos.c.id == record.video_id, videos.c.deleted_at.is_not(None)
                )
            )
            if deleted.rowcount == 1:
                await conn.execute(
                    update(blobs)
                    .where(blobs.c.content_hash == record.content_hash, blobs.c.ref_count > 0)
                    .values(
                        ref_count=blobs.c.ref_count - 1,
                        zero_since=case((blobs.c.ref_count == 1, now), else_=blobs.c.zero_since),
                    )
                )

    async def _mark(self, record: DeletionRecord, step: str) -> None:
        async with self._db.transaction() as conn:
            if not await self._deletions.mark_step(conn, record, step, self._clock()):
                raise DeletionRaceError(record.video_id)

    async def _note_failure(self, video_id: str, error: str) -> None:
        try:
            await self._deletions.note_failure(video_id, error, self._clock())
        # The database is likely what failed (and the step's own error is what matters);
        # the retry will note it next time.
        except Exception:  # noqa: BLE001
            logger.warning("could not note the failed deletion of video %s", video_id)
