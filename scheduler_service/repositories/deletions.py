"""Rows of ``video_deletions``: one per deleted video, with the steps already done."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import Database, DuplicateKeyError, translate_errors
from shared.db.schema import video_deletions

PENDING = "pending"
DONE = "done"
MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class DeletionRecord:
    video_id: str
    content_hash: str
    requested_at: datetime
    state: str
    steps_done: tuple[str, ...]
    attempts: int
    last_error: str | None
    updated_at: datetime
    finished_at: datetime | None


def _record(row: RowMapping) -> DeletionRecord:
    steps = row["steps_done"]
    return DeletionRecord(
        video_id=row["video_id"],
        content_hash=row["content_hash"],
        requested_at=row["requested_at"],
        state=row["state"],
        steps_done=tuple(s for s in steps.split(",") if s),
        attempts=int(row["attempts"]),
        last_error=row["last_error"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
    )


class DeletionRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(
        self, conn: AsyncConnection, *, video_id: str, content_hash: str, now: datetime
    ) -> bool:
        """Record the deletion in the caller's transaction; False if it was recorded before."""
        try:
            with translate_errors():
                await conn.execute(
                    video_deletions.insert().values(
                        video_id=video_id,
                        content_hash=content_hash,
                        requested_at=now,
                        state=PENDING,
                        steps_done="",
                        attempts=0,
                        updated_at=now,
                    )
                )
        except DuplicateKeyError:
            return False
        return True

    async def get(
        self, video_id: str, *, conn: AsyncConnection | None = None
    ) -> DeletionRecord | None:
        statement = select(video_deletions).where(video_deletions.c.video_id == video_id)
        if conn is not None:
            row = (await conn.execute(statement)).mappings().first()
        else:
            async with self._db.connect() as own:
                row = (await own.execute(statement)).mappings().first()
        return _record(row) if row else None

    async def pending(self, *, updated_before: datetime, limit: int) -> list[str]:
        """Ids of unfinished deletions nobody advanced since ``updated_before``, oldest first."""
        async with self._db.connect() as conn:
            rows = await conn.execute(
                select(video_deletions.c.video_id)
                .where(
                    video_deletions.c.state == PENDING,
                    video_deletions.c.updated_at <= updated_before,
                )
                .order_by(video_deletions.c.requested_at, video_deletions.c.video_id)
                .limit(limit)
            )
            return [row.video_id for row in rows]

    async def mark_steps(
        self,
        conn: AsyncConnection,
        record: DeletionRecord,
        steps: Sequence[str],
        now: datetime,
        *,
        finished: bool = False,
    ) -> bool:
        """Append ``steps`` to the steps done (and, if ``finished``, mark the deletion done),
        in the caller's transaction.

        Conditional on the steps the caller read: if another runner advanced the record
        meanwhile, nothing changes and False tells the caller to roll back its work. On
        MySQL the update also locks the row until the caller's commit, so a second runner
        waits here and then finds the record advanced.
        """
        values: dict[str, object] = {
            "steps_done": ",".join((*record.steps_done, *steps)),
            "updated_at": now,
        }
        if finished:
            values |= {"state": DONE, "finished_at": now, "last_error": None}
        result = await conn.execute(
            update(video_deletions)
            .where(
                video_deletions.c.video_id == record.video_id,
                video_deletions.c.steps_done == ",".join(record.steps_done),
            )
            .values(values)
        )
        return result.rowcount == 1

    async def set_steps(
        self, conn: AsyncConnection, video_id: str, steps: Sequence[str], now: datetime
    ) -> None:
        """Overwrite the steps done, in a transaction that already holds the row (after
        ``mark_steps`` claimed more than it could finish)."""
        await conn.execute(
            update(video_deletions)
            .where(video_deletions.c.video_id == video_id)
            .values(steps_done=",".join(steps), updated_at=now)
        )

    async def note_failure(self, video_id: str, error: str, now: datetime) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                update(video_deletions)
                .where(video_deletions.c.video_id == video_id)
                .values(
                    attempts=video_deletions.c.attempts + 1,
                    last_error=error[:MAX_ERROR_CHARS],
                    updated_at=now,
                )
            )
