"""Rows of the ``blobs`` table: one per stored file, shared by every upload of its bytes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import DuplicateKeyError, translate_errors
from shared.db.schema import blobs


class BlobRows:
    async def keep(
        self, conn: AsyncConnection, *, content_hash: str, size: int, now: datetime
    ) -> None:
        """Makes sure the stored file has its row, inside the caller's transaction.

        ``ref_count`` counts videos and is left alone. A row nothing references gets
        ``zero_since = now``: the collector's grace period starts again from this upload,
        so the file is not collected before its uploader has made a video of it.
        """
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
            await conn.execute(
                update(blobs)
                .where(blobs.c.content_hash == content_hash, blobs.c.ref_count == 0)
                .values(zero_since=now)
            )
