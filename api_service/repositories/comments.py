"""Comments in the database, joined with their author's name; each write moves the video's
``comment_count`` in the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import Database
from shared.db.schema import comments, users, videos


@dataclass(frozen=True, slots=True)
class Comment:
    id: str
    video_id: str
    author_id: str
    author_username: str
    content: str
    created_at: datetime


def _comment(row: RowMapping) -> Comment:
    return Comment(
        id=row["id"],
        video_id=row["video_id"],
        author_id=row["author_id"],
        author_username=row["username"],
        content=row["content"],
        created_at=row["created_at"],
    )


_WITH_AUTHOR = select(comments, users.c.username).join(users, users.c.id == comments.c.author_id)


class CommentRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def list(self, video_id: str, *, limit: int, after_id: str | None) -> list[Comment]:
        """Oldest first; ``after_id`` is the keyset cursor (the last id of the last page)."""
        statement = _WITH_AUTHOR.where(comments.c.video_id == video_id)
        if after_id is not None:
            statement = statement.where(comments.c.id > after_id)
        statement = statement.order_by(comments.c.id).limit(limit)
        # A page may lag by the replica's delay; the author's own reads are on the primary.
        async with self._db.reader() as conn:
            rows = (await conn.execute(statement)).mappings().all()
        return [_comment(row) for row in rows]

    async def get(self, comment_id: str, *, conn: AsyncConnection | None = None) -> Comment | None:
        statement = _WITH_AUTHOR.where(comments.c.id == comment_id)
        if conn is not None:
            row = (await conn.execute(statement)).mappings().first()
        else:
            async with self._db.connect() as own:
                row = (await own.execute(statement)).mappings().first()
        return _comment(row) if row else None

    async def add(
        self,
        conn: AsyncConnection,
        *,
        comment_id: str,
        video_id: str,
        author_id: str,
        content: str,
        created_at: datetime,
    ) -> bool:
        """Insert the comment and count it; False (nothing written) when the video is gone.

        The count goes first: its row lock orders concurrent comments on one video, and a
        video deleted meanwhile matches no row.
        """
        counted = await conn.execute(
            update(videos)
            .where(videos.c.id == video_id, videos.c.deleted_at.is_(None))
            .values(comment_count=videos.c.comment_count + 1)
        )
        if counted.rowcount != 1:
            return False
        await conn.execute(
            comments.insert().values(
                id=comment_id,
                video_id=video_id,
                author_id=author_id,
                content=content,
                created_at=created_at,
            )
        )
        return True

    async def delete(self, conn: AsyncConnection, comment: Comment) -> bool:
        """Remove the comment and uncount it; False when it was already gone."""
        removed = await conn.execute(comments.delete().where(comments.c.id == comment.id))
        if removed.rowcount != 1:
            return False
        await conn.execute(
            update(videos)
            .where(videos.c.id == comment.video_id, videos.c.comment_count > 0)
            .values(comment_count=videos.c.comment_count - 1)
        )
        return True
