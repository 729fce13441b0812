"""Unreferenced blobs: stored files no video has pointed at for a grace period.

A ``blobs`` row counts the videos that use its file; when the count drops to 0 the row
records ``zero_since`` (a completing upload sets it too: a finished upload holds its
file for the grace period, long enough to publish it). The collector removes, for each
row with ``ref_count = 0`` and ``zero_since`` older than ``grace``, in three steps:

1. **claim**: ``UPDATE blobs SET collecting_since = now WHERE content_hash = :h AND
   ref_count = 0 AND zero_since <= :cutoff``, committed with the finished uploads of that
   file marked ``expired``. If a reference or an upload came meanwhile, the condition
   fails and nothing changes. From the commit on, no video can take a reference
   (publishing answers 410 ``upload_expired``);
2. **files**: in one transaction that holds the row's lock (``SELECT ... FOR UPDATE``,
   still claimed), the file (``content_blob_key``) and its thumbnail (``thumbnail_key``)
   are deleted;
3. **row**: deleted in that same transaction, which then commits.

Why the lock across the file deletion: an upload completing with these bytes (a dedup
completion that found the file stored and wrote nothing, or an instant upload's proof)
locks the same row in the transaction that records it, and checks under that lock that
the file is stored. So it either comes first (the collector's step 2 then finds the claim
taken over and deletes nothing) or waits until step 3 committed, finds the file gone and
writes it again from its chunks (an instant upload, which has none, answers 409
``instant_unavailable``). No order of the two leaves a row, an upload or a video pointing
at a missing file. Tested on MariaDB with each side held mid-way
(``tests/integration/test_blob_ledger.py``).

Why a claim committed first rather than one transaction: a crash between deleting the
file and committing would roll the row back to "unreferenced" with its file gone, and a
video published then would have no file. A crash after the claim leaves a claimed row,
which no video can reference and which the next run (or a completing upload) finishes.

Every step is safe to repeat: deleting a missing file is a no-op, a claim is taken again
by the next run, and a row already gone is simply not found.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, func, literal, or_, select, update

from shared.blobs import BlobStore
from shared.db import Database
from shared.db.schema import UPLOAD_COMPLETE, UPLOAD_EXPIRED
from shared.db.schema import blobs as blobs_table
from shared.db.schema import uploads as uploads_table
from shared.layout import content_blob_key, thumbnail_key

logger = logging.getLogger(__name__)

DEFAULT_GRACE = timedelta(hours=24)
DEFAULT_BATCH_SIZE = 100


class BlobCollector:
    """``await collector.run()`` deletes unreferenced blobs; returns how many it deleted."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        grace: timedelta = DEFAULT_GRACE,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._db = db
        self._blobs = blobs
        self._grace = grace
        self._batch_size = batch_size

    @property
    def grace(self) -> timedelta:
        """How long a blob stays unreferenced before it is collected."""
        return self._grace

    async def run(self) -> int:
        cutoff = datetime.now(UTC) - self._grace
        collected = 0
        # Candidates are listed after the previous batch was handled; a row that was not
        # collected (re-referenced meanwhile) no longer matches, so the loop ends.
        while True:
            candidates = await self.candidates(cutoff)
            for content_hash in candidates:
                if await self.collect(content_hash, cutoff):
                    collected += 1
            if len(candidates) < self._batch_size:
                return collected

    async def candidates(self, cutoff: datetime) -> list[str]:
        """Hashes of blobs unreferenced since before ``cutoff``, longest unreferenced
        first, and of blobs claimed by a collection that did not finish."""
        async with self._db.connect() as conn:
            rows = await conn.execute(
                select(blobs_table.c.content_hash)
                .where(or_(_collectable(cutoff), _claimed()))
                .order_by(blobs_table.c.zero_since, blobs_table.c.content_hash)
                .limit(self._batch_size)
            )
            return [row.content_hash for row in rows]

    async def collect(self, content_hash: str, cutoff: datetime) -> bool:
        """Delete the blob if it is still unreferenced since before ``cutoff`` (or claimed
        by an earlier run that did not finish).

        Returns False (and deletes nothing) if it gained a reference, was taken over by a
        completing upload, or is already gone.
        """
        if not await self._claim(content_hash, cutoff):
            return False
        async with self._db.transaction() as conn:
            # The row's lock is held until the row is gone: a completing upload of these
            # bytes waits here, then sees the file missing and stores it again.
            still_claimed = (
                await conn.execute(
                    select(blobs_table.c.content_hash)
                    .where(blobs_table.c.content_hash == content_hash, _claimed())
                    .with_for_update()
                )
            ).first()
            if still_claimed is None:
                return False
            await self._blobs.delete(content_blob_key(content_hash))
            await self._blobs.delete(thumbnail_key(content_hash))
            await conn.execute(
                delete(blobs_table).where(blobs_table.c.content_hash == content_hash)
            )
        logger.info("collected blob %s", content_hash, extra={"content_hash": content_hash})
        return True

    async def _claim(self, content_hash: str, cutoff: datetime) -> bool:
        """Step 1: the row marked as being collected, and the finished uploads of its file
        marked expired, if it is still collectable (or claimed already)."""
        async with self._db.transaction() as conn:
            claimed = await conn.execute(
                update(blobs_table)
                .where(
                    blobs_table.c.content_hash == content_hash,
                    or_(_collectable(cutoff), _claimed()),
                )
                .values(
                    # An earlier claim keeps its time: how long a claim has been open.
                    collecting_since=func.coalesce(
                        blobs_table.c.collecting_since,
                        literal(datetime.now(UTC), blobs_table.c.collecting_since.type),
                    )
                )
            )
            if claimed.rowcount != 1:
                return False
            # Nothing may be published from them any more; GET /uploads/{id} says so.
            await conn.execute(
                update(uploads_table)
                .where(
                    uploads_table.c.content_hash == content_hash,
                    uploads_table.c.state == UPLOAD_COMPLETE,
                )
                .values(state=UPLOAD_EXPIRED)
            )
        return True


def _collectable(cutoff: datetime) -> ColumnElement[bool]:
    return and_(
        blobs_table.c.ref_count == 0,
        blobs_table.c.zero_since.is_not(None),
        blobs_table.c.zero_since <= cutoff,
    )


def _claimed() -> ColumnElement[bool]:
    return blobs_table.c.collecting_since.is_not(None)
