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
5. ``cache``     the Redis cache keys of the video (api JSON and stream view);
6. ``danmaku_redis`` the video's danmaku buckets in Redis (``danmaku_bucket_keys``: every
   6-minute bucket a danmaku offset can fall in, 0 to 24 h, in one ``DEL``). Last, after
   the cache: by then neither a send nor a window read can find the video, so nothing
   refills a bucket behind this step. Deleting keys that are gone already is harmless,
   so a repeat changes nothing.

Database steps record themselves in the transaction that does the work, conditionally on
the steps read before (``DeletionRepository.mark_steps``): a second runner on the same
video blocks on the row, then finds it advanced and stops. Steps outside the database
(files, cache) are safe to repeat, and are recorded after they are done.

Few round trips, because a broker restart can hand thousands of deletions to one replica
at once: the database steps of a video with fewer than ``batch_size`` comments and
danmaku go in one transaction (``comments``, ``danmaku`` and ``video`` recorded
together); the outside steps run one after another and are recorded, with the deletion's
end, in one more. A video with more rows than a batch deletes them a batch per
transaction first, recording each child step when its last batch goes.

Comments and danmaku arrive with their own migration: a table missing from
``shared.db.schema`` has nothing to delete, and its step is recorded as done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import case, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_service.jobs.blob_collector import BlobCollector
from scheduler_service.repositories.deletions import DONE, DeletionRecord, DeletionRepository
from shared.cache import forget_cached
from shared.db import Database
from shared.db.schema import blobs, metadata, videos
from shared.kv import KeyValueStore
from shared.layout import STREAM_CACHE_PREFIX, VIDEO_CACHE_PREFIX, danmaku_bucket_keys

logger = logging.getLogger(__name__)

STEPS: tuple[str, ...] = ("comments", "danmaku", "video", "blob", "cache", "danmaku_redis")
# Tables holding rows of a video (column ``video_id``), emptied before the video row goes.
CHILD_TABLES: dict[str, str] = {"comments": "comments", "danmaku": "danmaku"}
# The steps done in database transactions; the others are files and Redis keys.
DATABASE_STEPS = frozenset({*CHILD_TABLES, "video"})
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
        record = await self._deletions.get(video_id)
        while record is not None and record.state != DONE:
            try:
                record = await self._advance(record)
            except DeletionRaceError:
                races += 1
                if races > MAX_RACES:
                    raise
                record = await self._deletions.get(video_id)
            except Exception as exc:
                await self._note_failure(video_id, f"{type(exc).__name__}: {exc}")
                raise
        return record

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

    async def _advance(self, record: DeletionRecord) -> DeletionRecord:
        """Do the next group of steps: the database ones in one transaction, or every
        outside one and the finish; returns the record as this runner left it."""
        remaining = [step for step in STEPS if step not in record.steps_done]
        database_steps = [step for step in remaining if step in DATABASE_STEPS]
        if database_steps:
            done = await self._database_steps(record, database_steps)
        else:
            await self._outside_steps(record, remaining)
            done = remaining
        steps = (*record.steps_done, *done)
        finished = len(steps) == len(STEPS)
        if finished:
            logger.info("video %s deleted", record.video_id, extra={"video_id": record.video_id})
        now = self._clock()
        return replace(
            record,
            steps_done=steps,
            state=DONE if finished else record.state,
            updated_at=now,
            finished_at=now if finished else None,
        )

    async def _database_steps(self, record: DeletionRecord, steps: list[str]) -> list[str]:
        """``steps`` (a run of database steps, in order) in one transaction; stops after a
        child table that has more rows than one batch. Returns the steps it completed."""
        now = self._clock()
        async with self._db.transaction() as conn:
            # First: the record's row lock makes a concurrent runner wait, then miss.
            if not await self._deletions.mark_steps(conn, record, steps, now):
                raise DeletionRaceError(record.video_id)
            for index, step in enumerate(steps):
                if step == "video":
                    await self._delete_video(conn, record, now)
                elif not await self._delete_children(conn, record, step):
                    # More rows than one batch: keep what this transaction did, record
                    # only the steps it finished, and come back for the rest.
                    done = steps[:index]
                    await self._deletions.set_steps(
                        conn, record.video_id, [*record.steps_done, *done], now
                    )
                    return done
        return steps

    async def _delete_children(
        self, conn: AsyncConnection, record: DeletionRecord, step: str
    ) -> bool:
        """One batch of ``step``'s rows; True when no row of the video is left. A table
        missing from the schema (its feature not there yet) has nothing to delete."""
        table = metadata.tables.get(CHILD_TABLES[step])
        if table is None or "video_id" not in table.c:
            return True
        key = next(iter(table.primary_key.columns))
        ids = [
            row[0]
            for row in await conn.execute(
                select(key).where(table.c.video_id == record.video_id).limit(self._batch_size)
            )
        ]
        if ids:
            await conn.execute(delete(table).where(key.in_(ids)))
        return len(ids) < self._batch_size

    async def _delete_video(
        self, conn: AsyncConnection, record: DeletionRecord, now: datetime
    ) -> None:
        deleted = await conn.execute(
            delete(videos).where(videos.c.id == record.video_id, videos.c.deleted_at.is_not(None))
        )
        if deleted.rowcount == 1:
            await conn.execute(
                update(blobs)
                .where(blobs.c.content_hash == record.content_hash, blobs.c.ref_count > 0)
                # MySQL and MariaDB apply SET assignments left to right, each seeing the
                # ones before it (SQLite and PostgreSQL see the old row): zero_since must
                # read ref_count before it is decremented, so it goes first.
                .ordered_values(
                    (
                        blobs.c.zero_since,
                        case((blobs.c.ref_count == 1, now), else_=blobs.c.zero_since),
                    ),
                    (blobs.c.ref_count, blobs.c.ref_count - 1),
                )
            )

    async def _outside_steps(self, record: DeletionRecord, steps: list[str]) -> None:
        """The steps outside the database, each safe to repeat, then one transaction that
        records them and the deletion's end (so a crash in between repeats them)."""
        if "blob" in steps:
            await self._collector.collect(
                record.content_hash, self._clock() - self._collector.grace
            )
        if "cache" in steps:
            for prefix in (VIDEO_CACHE_PREFIX, STREAM_CACHE_PREFIX):
                await forget_cached(self._kv, prefix, [record.video_id])
        if "danmaku_redis" in steps:
            await self._kv.delete(*danmaku_bucket_keys(record.video_id))
        async with self._db.transaction() as conn:
            if not await self._deletions.mark_steps(
                conn, record, steps, self._clock(), finished=True
            ):
                raise DeletionRaceError(record.video_id)

    async def _note_failure(self, video_id: str, error: str) -> None:
        try:
            await self._deletions.note_failure(video_id, error, self._clock())
        # The database is likely what failed (and the step's own error is what matters);
        # the retry will note it next time.
        except Exception:  # noqa: BLE001
            logger.warning("could not note the failed deletion of video %s", video_id)
