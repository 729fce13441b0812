"""Videos: publish a finished upload, read through the cache, edit, soft-delete.

Reads of one video go through a Redis read-through cache (jittered TTL, negative
entries, one loader per key); every write invalidates after its transaction commits.
Deletion hides the video in the same transaction that queues ``video.deleted`` in the
outbox, so the scheduler's clean-up can be late but never lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from api_service.repositories.users import UserRepository
from api_service.repositories.videos import Video, VideoRepository
from api_service.services.pagination import decode_cursor, encode_cursor
from shared.auth import Identity
from shared.bus import Event
from shared.cache import CacheInvalidations, ReadThroughCache, forget_cached
from shared.db import Database, DuplicateKeyError, new_id
from shared.db.schema import UPLOAD_COMPLETE, UPLOAD_EXPIRED
from shared.errors import ConflictError, ForbiddenError, GoneError, NotFoundError
from shared.events import VIDEO_DELETED
from shared.kv import KeyValueStore
from shared.layout import (
    STREAM_CACHE_PREFIX,
    VIDEO_CACHE_PREFIX,
    is_upload_id,
    upload_state_key,
)
from shared.outbox import add_event


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Video]
    next_cursor: str | None


def _same_text(text: str) -> str:
    return text


def video_not_found(video_id: str) -> NotFoundError:
    return NotFoundError(f"No video {video_id!r}.", code="video_not_found")


def upload_expired() -> GoneError:
    return GoneError(
        "The upload's file was removed because no video used it in time; upload the file again.",
        code="upload_expired",
    )


class VideoService:
    def __init__(
        self,
        *,
        db: Database,
        videos: VideoRepository,
        users: UserRepository,
        kv: KeyValueStore,
        cache: ReadThroughCache[dict[str, Any]],
        to_json: Callable[[Video], dict[str, Any]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        invalidations: CacheInvalidations | None = None,
    ) -> None:
        self._db = db
        self._videos = videos
        self._users = users
        self._kv = kv
        self._cache = cache
        # The same entries as ``cache`` (same keys, same JSON text), handed out as the
        # text itself: a read answered from the cache is sent as stored, not decoded and
        # encoded again. The hot read: copies are kept in the process too (text cannot
        # be changed by a caller, unlike ``cache``'s dicts).
        self._text_cache: ReadThroughCache[str] = ReadThroughCache(
            kv,
            prefix=VIDEO_CACHE_PREFIX,
            encode=_same_text,
            decode=_same_text,
            invalidations=invalidations,
            keep_local_copies=True,
        )
        self._to_json = to_json
        self._clock = clock

    async def create(
        self, identity: Identity, *, title: str, description: str, upload_id: str
    ) -> dict[str, Any]:
        upload = await self._videos.finished_upload(upload_id) if is_upload_id(upload_id) else None
        if upload is None:
            if is_upload_id(upload_id) and await self._kv.exists(upload_state_key(upload_id)):
                raise ConflictError(
                    "The upload is not complete yet: send the missing chunks and complete it.",
                    code="upload_incomplete",
                )
            raise NotFoundError(f"No upload {upload_id!r}.", code="upload_not_found")
        if upload.owner_id != identity.user_id:
            raise ForbiddenError("That upload belongs to someone else.", code="upload_forbidden")
        if upload.state == UPLOAD_EXPIRED:
            raise upload_expired()
        if upload.state != UPLOAD_COMPLETE:
            raise ConflictError("The upload is not complete yet.", code="upload_incomplete")
        now = self._clock()
        video_id = new_id()
        try:
            async with self._db.transaction() as conn:
                added = await self._videos.add(
                    conn,
                    {
                        "id": video_id,
                        "owner_id": identity.user_id,
                        "upload_id": upload.id,
                        "title": title,
                        "description": description,
                        "content_hash": upload.content_hash,
                        "size": upload.size,
                        "filename": upload.filename,
                        "status": "processing",
                        "created_at": now,
                        "updated_at": now,
                    },
                )
                if not added:
                    # Collected, or being collected, since the upload's row was read.
                    raise upload_expired()
                # Read back on the primary, in the writer's transaction: the creator sees
                # the video at once even where reads go to a lagging replica.
                video = await self._videos.get(video_id, conn=conn)
        except DuplicateKeyError:
            raise ConflictError(
                "A video was already published from this upload.", code="upload_already_used"
            ) from None
        assert video is not None  # noqa: S101 - inserted in the same transaction
        await self._cache.invalidate(video_id)  # a negative entry from an early reader
        return self._to_json(video)

    async def get(self, video_id: str) -> dict[str, Any]:
        async def load() -> dict[str, Any] | None:
            video = await self._videos.get(video_id)
            return self._to_json(video) if video else None

        found = await self._cache.get(video_id, load) if video_id.isalnum() else None
        if found is None:
            raise video_not_found(video_id)
        return found

    async def get_json(self, video_id: str) -> str:
        """``get``'s answer as JSON text, as the cache holds it."""

        async def load() -> str | None:
            video = await self._videos.get(video_id)
            return orjson.dumps(self._to_json(video)).decode() if video else None

        found = await self._text_cache.get(video_id, load) if video_id.isalnum() else None
        if found is None:
            raise video_not_found(video_id)
        return found

    async def list(
        self,
        *,
        limit: int,
        cursor: str | None,
        author: str | None = None,
        query: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        owner_id = None
        if author is not None:
            user = await self._users.by_username(author)
            if user is None:
                return [], None
            owner_id = user.id
        before = decode_cursor(cursor) if cursor else None
        # One extra row tells whether there is a next page without a count query.
        rows = await self._videos.list(
            limit=limit + 1, before_id=before, owner_id=owner_id, query=query
        )
        page, more = rows[:limit], len(rows) > limit
        return [self._to_json(v) for v in page], (encode_cursor(page[-1].id) if more else None)

    async def _owned(self, identity: Identity, video_id: str) -> Video:
        video = await self._videos.get(video_id) if video_id.isalnum() else None
        if video is None:
            raise video_not_found(video_id)
        if video.owner_id != identity.user_id:
            raise ForbiddenError("Only the video's owner may do that.", code="not_video_owner")
        return video

    async def update(
        self, identity: Identity, video_id: str, changes: dict[str, str]
    ) -> dict[str, Any]:
        await self._owned(identity, video_id)
        async with self._db.transaction() as conn:
            updated = await self._videos.update_text(
                conn, video_id, changes | {"updated_at": self._clock()}
            )
            video = await self._videos.get(video_id, conn=conn)
        if not updated or video is None:
            raise video_not_found(video_id)
        await self._cache.invalidate(video_id)
        return self._to_json(video)

    async def delete(self, identity: Identity, video_id: str) -> None:
        video = await self._owned(identity, video_id)
        async with self._db.transaction() as conn:
            deleted = await self._videos.soft_delete(conn, video_id, self._clock())
            if deleted:
                await add_event(
                    conn,
                    Event.new(
                        VIDEO_DELETED,
                        {
                            "video_id": video.id,
                            "owner_id": video.owner_id,
                            "content_hash": video.content_hash,
                        },
                    ),
                )
        try:
            await self._cache.invalidate(video_id)
        finally:
            # stream_service's cached view too, whatever became of the first: a deleted
            # video stops streaming at once.
            await forget_cached(self._kv, STREAM_CACHE_PREFIX, [video_id])
        if not deleted:
            raise video_not_found(video_id)
