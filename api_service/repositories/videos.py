"""Videos in the database, joined with their author's name; soft-deleted rows are gone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, func, literal_column, or_, select, text, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import Database
from shared.db.schema import blobs, uploads, users, videos

# Search words: letters and digits of any script; operators of the search syntax never
# reach the database from a user.
_WORD_RE = re.compile(r"\w+")
MAX_SEARCH_WORDS = 8
# FTS5's trigram tokenizer needs three characters to use the index.
_TRIGRAM = 3


@dataclass(frozen=True, slots=True)
class Video:
    id: str
    owner_id: str
    owner_username: str
    upload_id: str
    title: str
    description: str
    content_hash: str
    size: int
    filename: str
    status: str
    failure_reason: str | None
    duration_ms: int | None
    has_thumbnail: bool
    comment_count: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class FinishedUpload:
    id: str
    owner_id: str
    filename: str
    size: int
    content_hash: str
    state: str


def _video(row: RowMapping) -> Video:
    return Video(
        id=row["id"],
        owner_id=row["owner_id"],
        owner_username=row["username"],
        upload_id=row["upload_id"],
        title=row["title"],
        description=row["description"],
        content_hash=row["content_hash"],
        size=int(row["size"]),
        filename=row["filename"],
        status=row["status"],
        failure_reason=row["failure_reason"],
        duration_ms=row["duration_ms"],
        has_thumbnail=bool(row["has_thumbnail"]),
        comment_count=int(row["comment_count"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _visible() -> Select[Any]:
    return (
        select(videos, users.c.username)
        .join(users, users.c.id == videos.c.owner_id)
        .where(videos.c.deleted_at.is_(None))
    )


class VideoRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def finished_upload(self, upload_id: str) -> FinishedUpload | None:
        async with self._db.connect() as conn:
            row = (
                (await conn.execute(select(uploads).where(uploads.c.id == upload_id)))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return FinishedUpload(
            id=row["id"],
            owner_id=row["owner_id"],
            filename=row["filename"],
            size=int(row["size"]),
            content_hash=row["content_hash"],
            state=row["state"],
        )

    async def add(self, conn: AsyncConnection, values: dict[str, Any]) -> bool:
        """Insert a video; ``DuplicateKeyError`` when its upload already has one. False,
        with nothing written, when its file is gone or being collected.

        A file the scheduler has already probed gives the video its media result at once
        (ready or failed). The blob row is updated first: that row lock orders this
        transaction with the scheduler's, which records a result on the row before it
        marks the file's videos, so a video is never left ``processing`` by a result
        that went by while it was being created.
        """
        # The blob now has one more video; it is no longer a candidate for collection.
        # A row the collector has claimed (or removed) takes no reference: its file is
        # being deleted, and a video of it would never stream.
        referenced = await conn.execute(
            update(blobs)
            .where(
                blobs.c.content_hash == values["content_hash"],
                blobs.c.collecting_since.is_(None),
            )
            .values(ref_count=blobs.c.ref_count + 1, zero_since=None)
        )
        if referenced.rowcount != 1:
            return False
        media = (
            await conn.execute(
                select(
                    blobs.c.media_status,
                    blobs.c.duration_ms,
                    blobs.c.failure_reason,
                    blobs.c.has_thumbnail,
                ).where(blobs.c.content_hash == values["content_hash"])
            )
        ).first()
        if media is not None and media.media_status is not None:
            values = values | {
                "status": media.media_status,
                "duration_ms": media.duration_ms,
                "failure_reason": media.failure_reason,
                "has_thumbnail": bool(media.has_thumbnail),
            }
        await conn.execute(videos.insert().values(**values))
        return True

    async def get(self, video_id: str, *, conn: AsyncConnection | None = None) -> Video | None:
        # The primary: one video's JSON is cached for minutes, far longer than a replica
        # lags, so a stale read here would outlive the lag.
        statement = _visible().where(videos.c.id == video_id)
        if conn is not None:
            row = (await conn.execute(statement)).mappings().first()
        else:
            async with self._db.connect() as own:
                row = (await own.execute(statement)).mappings().first()
        return _video(row) if row else None

    async def list(
        self,
        *,
        limit: int,
        before_id: str | None = None,
        owner_id: str | None = None,
        query: str | None = None,
    ) -> list[Video]:
        """Newest first; ``before_id`` is the keyset cursor (the last id of the last page)."""
        statement = _visible()
        if before_id is not None:
            statement = statement.where(videos.c.id < before_id)
        if owner_id is not None:
            statement = statement.where(videos.c.owner_id == owner_id)
        if query:
            statement = statement.where(self._search(query))
        statement = statement.order_by(videos.c.id.desc()).limit(limit)
        # A list may lag by the replica's delay; a writer's own reads are on the primary.
        async with self._db.reader() as conn:
            rows = (await conn.execute(statement)).mappings().all()
        return [_video(row) for row in rows]

    def _search(self, query: str) -> Any:
        words = _WORD_RE.findall(query)[:MAX_SEARCH_WORDS]
        if not words:
            return literal_column("1") == 0  # only punctuation: nothing can match
        if self._db.dialect_name == "sqlite":
            return and_(*(self._sqlite_word(word, i) for i, word in enumerate(words)))
        # InnoDB FULLTEXT, boolean mode: every word required, as a prefix.
        boolean = " ".join(f"+{word}*" for word in words)
        return text(
            "MATCH (videos.title, videos.description) AGAINST (:q IN BOOLEAN MODE)"
        ).bindparams(q=boolean)

    @staticmethod
    def _sqlite_word(word: str, index: int) -> Any:
        if len(word) < _TRIGRAM:
            pattern = f"%{word}%"
            return or_(videos.c.title.like(pattern), videos.c.description.like(pattern))
        # A quoted FTS5 string: the word as literal text, whatever characters it has.
        phrase = '"' + word.replace('"', '""') + '"'
        name = f"w{index}"
        # Only the parameter's name is formatted in; the word itself is bound.
        sql = f"videos.rowid IN (SELECT rowid FROM videos_search WHERE videos_search MATCH :{name})"  # noqa: S608
        return text(sql).bindparams(**{name: phrase})

    async def update_text(
        self, conn: AsyncConnection, video_id: str, values: dict[str, Any]
    ) -> bool:
        result = await conn.execute(
            update(videos)
            .where(videos.c.id == video_id, videos.c.deleted_at.is_(None))
            .values(**values)
        )
        return result.rowcount == 1

    async def soft_delete(self, conn: AsyncConnection, video_id: str, now: datetime) -> bool:
        """Hide the video; False when it was already gone (a repeated DELETE)."""
        result = await conn.execute(
            update(videos)
            .where(videos.c.id == video_id, videos.c.deleted_at.is_(None))
            .values(deleted_at=now, updated_at=now)
        )
        return result.rowcount == 1

    async def count_by_owner(self, owner_id: str) -> int:
        async with self._db.reader() as conn:
            result = await conn.execute(
                select(func.count())
                .select_from(videos)
                .where(videos.c.owner_id == owner_id, videos.c.deleted_at.is_(None))
            )
            return int(result.scalar_one())
