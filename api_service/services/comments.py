"""Comments: list oldest first, post (rate-limited, blocked words refused), delete.

Each insert and delete moves ``videos.comment_count`` in the same transaction, then
drops the video's cached JSON (after the commit), so the count a reader sees is the
number of rows.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from api_service.repositories.comments import Comment, CommentRepository
from api_service.services.pagination import decode_cursor, encode_cursor
from api_service.services.spam import BlockedWords, RateLimit
from api_service.services.videos import VideoService, video_not_found
from shared.auth import Identity
from shared.cache import ReadThroughCache
from shared.db import Database, new_id
from shared.errors import BadRequestError, ForbiddenError, NotFoundError


def comment_json(comment: Comment) -> dict[str, Any]:
    """The public shape of a comment (``Comment`` in gateway/openapi.json)."""
    return {
        "id": comment.id,
        "author": {"id": comment.author_id, "username": comment.author_username},
        "content": comment.content,
        "created_at": comment.created_at.isoformat(),
    }


def comment_not_found(comment_id: str) -> NotFoundError:
    return NotFoundError(f"No comment {comment_id!r} on this video.", code="comment_not_found")


class CommentService:
    def __init__(
        self,
        *,
        db: Database,
        comments: CommentRepository,
        videos: VideoService,
        video_cache: ReadThroughCache[dict[str, Any]],
        rate_limit: RateLimit,
        blocked_words: BlockedWords,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._comments = comments
        self._videos = videos
        self._video_cache = video_cache
        self._rate_limit = rate_limit
        self._blocked = blocked_words
        self._clock = clock

    async def list(
        self, video_id: str, *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        after = decode_cursor(cursor) if cursor else None
        await self._videos.get(video_id)  # 404 for an unknown or deleted video
        # One extra row tells whether there is a next page without a count query.
        rows = await self._comments.list(video_id, limit=limit + 1, after_id=after)
        page, more = rows[:limit], len(rows) > limit
        return [comment_json(c) for c in page], (encode_cursor(page[-1].id) if more else None)

    async def create(self, identity: Identity, video_id: str, content: str) -> dict[str, Any]:
        await self._videos.get(video_id)
        if self._blocked.matches(content):
            raise BadRequestError(
                "The comment contains a word that is not allowed here.", code="blocked_words"
            )
        await self._rate_limit.hit(identity.user_id)
        comment_id = new_id()
        async with self._db.transaction() as conn:
            added = await self._comments.add(
                conn,
                comment_id=comment_id,
                video_id=video_id,
                author_id=identity.user_id,
                content=content,
                created_at=self._clock(),
            )
            # Read back in the writer's transaction: the author sees it at once.
            comment = await self._comments.get(comment_id, conn=conn) if added else None
        if comment is None:
            raise video_not_found(video_id)  # deleted between the check and the insert
        await self._video_cache.invalidate(video_id)
        return comment_json(comment)

    async def delete(self, identity: Identity, video_id: str, comment_id: str) -> None:
        video = await self._videos.get(video_id)
        comment = await self._comments.get(comment_id) if comment_id.isalnum() else None
        if comment is None or comment.video_id != video_id:
            raise comment_not_found(comment_id)
        if identity.user_id not in (comment.author_id, video["author"]["id"]):
            raise ForbiddenError(
                "Only the comment's author or the video's owner may delete it.",
                code="comment_forbidden",
            )
        async with self._db.transaction() as conn:
            deleted = await self._comments.delete(conn, comment)
        await self._video_cache.invalidate(video_id)
        if not deleted:
            raise comment_not_found(comment_id)
