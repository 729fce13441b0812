"""Rows of the ``blobs`` table: one per stored file, shared by every upload of its bytes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import DuplicateKeyError, translate_errors
from shared.db.schema import blobs


class BlobRows:
    async def keep(
        self, conn: AsyncConnection, *, content_hash: str, size: int, now: datetime
    ) -> None:
        """Makes sure the stored file has its row, inside the caller's transaction, and
        holds the row's lock until that transaction ends.

        ``ref_count`` counts videos and is left alone. A row nothing references gets
        ``zero_since = now``: the collector's grace period starts again from this upload,
        so the file is not collected before its uploader has made a video of it.

        The collector deletes a file only while it holds this lock, on a row it claimed
        (``collecting_since``) beforehand. A claimed row is taken over here: deleted and
        written afresh, unclaimed (its thumbnail may be gone: the media are probed again).
        So once this returns, a file the caller finds stored stays stored; a file it
        finds missing is the caller's to store before it commits.
        """
        # Twice at most: an insert that meets a duplicate key found a row another upload
        # of these bytes inserted meanwhile, which the second pass locks like any other.
        for attempt in range(2):
            claim = (
                await conn.execute(
                    select(blobs.c.collecting_since)
                    .where(blobs.c.content_hash == content_hash)
                    .with_for_update()
                )
            ).first()
            if claim is not None and claim.collecting_since is not None:
                await conn.execute(delete(blobs).where(blobs.c.content_hash == content_hash))
                claim = None
            if claim is not None:
                await conn.execute(
                    update(blobs)
                    .where(blobs.c.content_hash == content_hash, blobs.c.ref_count == 0)
                    .values(zero_since=now)
                )
                return
            try:
                with translate_errors():
                    await conn.execute(
                        blobs.insert().values(
                            content_hash=content_hash,
                            size=size,
                            ref_count=0,
                            created_at=now,
                            zero_since=now,
                        )
                    )
            except DuplicateKeyError:
                if attempt:
                    raise
            else:
                return
