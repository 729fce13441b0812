"""Finished uploads in the database: the record that outlives the Redis state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import Database, translate_errors
from shared.db.schema import uploads

# The one state a row has today; the videos issue may add more (e.g. a used upload).
COMPLETE = "complete"


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadRecord:
    id: str
    owner_id: str
    filename: str
    size: int
    content_hash: str
    chunk_size: int
    instant: bool
    state: str
    created_at: datetime
    completed_at: datetime | None

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    @property
    def total_chunks(self) -> int:
        return -(-self.size // self.chunk_size)


def _record(row: RowMapping) -> UploadRecord:
    return UploadRecord(
        id=row["id"],
        owner_id=row["owner_id"],
        filename=row["filename"],
        size=row["size"],
        content_hash=row["content_hash"],
        chunk_size=row["chunk_size"],
        instant=bool(row["instant"]),
        state=row["state"],
        created_at=row["created_at"],
        completed_at=row["completed_at"],
    )


class UploadRecords:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def by_id(self, upload_id: str) -> UploadRecord | None:
        async with self._db.connect() as conn:
            result = await conn.execute(select(uploads).where(uploads.c.id == upload_id))
            row = result.mappings().first()
        return _record(row) if row else None

    async def add(self, conn: AsyncConnection, record: UploadRecord) -> None:
        """Inserts ``record``; ``DuplicateKeyError`` if the upload is recorded already."""
        with translate_errors():
            await conn.execute(
                uploads.insert().values(
                    id=record.id,
                    owner_id=record.owner_id,
                    filename=record.filename,
                    size=record.size,
                    content_hash=record.content_hash,
                    chunk_size=record.chunk_size,
                    instant=record.instant,
                    state=record.state,
                    created_at=record.created_at,
                    completed_at=record.completed_at,
                )
            )
