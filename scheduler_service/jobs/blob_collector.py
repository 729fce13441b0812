"""Unreferenced blobs: stored files no video has pointed at for a grace period.

A ``blobs`` row counts the videos that use its file; when the count drops to 0 the row
records ``zero_since``. The collector deletes, for each row with ``ref_count = 0`` and
``zero_since`` older than ``grace``:

1. the row, with ``DELETE ... WHERE content_hash = :h AND ref_count = 0 AND
   zero_since <= :cutoff``, committed on its own: if a new reference appeared since the
   row was listed, the condition fails, nothing is deleted, and the blob is kept;
2. then the file (``content_blob_key``) and its thumbnail (``thumbnail_key``).

Every step is safe to repeat: deleting a missing file is a no-op, and a row whose file
was already deleted is simply removed.

Why row first, file second: a crash (or a blob store failure) between the two leaves a
file without a row, which is harmless (no video can reach it; a new upload of the same
content writes it again). The other order could leave a row whose file is gone, and the
next upload of that content would be "instantly" deduplicated onto a missing file.

The race accepted: between the row's commit and the file's deletion (milliseconds), an
upload of exactly this content could complete, insert a new row and write the file, which
the collector then deletes. The uploader closes it by checking, after committing its
``blobs`` row, that the file is still there (and writing it again if not).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, select

from shared.blobs import BlobStore
from shared.db import Database
from shared.db.schema import blobs as blobs_table
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
        """Hashes of blobs unreferenced since before ``cutoff``, longest unreferenced first."""
        async with self._db.connect() as conn:
            rows = await conn.execute(
                select(blobs_table.c.content_hash)
                .where(_collectable(cutoff))
                .order_by(blobs_table.c.zero_since, blobs_table.c.content_hash)
                .limit(self._batch_size)
            )
            return [row.content_hash for row in rows]

    async def collect(self, content_hash: str, cutoff: datetime) -> bool:
        """Delete the blob if it is still unreferenced since before ``cutoff``.

        Returns False (and deletes nothing) if it gained a reference or is already gone.
        """
        async with self._db.transaction() as conn:
            result = await conn.execute(
                delete(blobs_table).where(
                    blobs_table.c.content_hash == content_hash, _collectable(cutoff)
                )
            )
        if result.rowcount != 1:
            return False
        # The row is gone for good: from here on only the files are left to remove.
        await self._blobs.delete(content_blob_key(content_hash))
        await self._blobs.delete(thumbnail_key(content_hash))
        logger.info("collected blob %s", content_hash, extra={"content_hash": content_hash})
        return True


def _collectable(cutoff: datetime) -> ColumnElement[bool]:
    return and_(
        blobs_table.c.ref_count == 0,
        blobs_table.c.zero_since.is_not(None),
        blobs_table.c.zero_since <= cutoff,
    )
