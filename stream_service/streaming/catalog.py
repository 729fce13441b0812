"""Which bytes a video id streams: looked up once, then cached in Redis.

The entry (content hash, size, time, media type) is what every range request needs, so
it is read through the cache with jitter, negative entries and one loader per key, and
copied into the process while its invalidations are subscribed (shared.cache); the api
invalidates it when the video is deleted, so a deleted video stops streaming at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

import orjson
from sqlalchemy import select

from shared.blobs import BlobStore
from shared.cache import CacheInvalidations, ReadThroughCache
from shared.db import Database
from shared.db.schema import videos
from shared.kv import KeyValueStore
from shared.layout import STREAM_CACHE_PREFIX, content_blob_key
from stream_service.streaming.sniff import SNIFF_BYTES, sniff_media_type


@dataclass(frozen=True, slots=True)
class StreamableVideo:
    video_id: str
    content_hash: str
    size: int
    modified: datetime
    media_type: str
    has_thumbnail: bool

    @property
    def blob_key(self) -> str:
        return content_blob_key(self.content_hash)


def _encode(video: StreamableVideo) -> str:
    return orjson.dumps(asdict(video)).decode()


def _decode(raw: str) -> StreamableVideo:
    data = orjson.loads(raw)
    data["modified"] = datetime.fromisoformat(data["modified"])
    return StreamableVideo(**data)


class VideoCatalog:
    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        kv: KeyValueStore,
        invalidations: CacheInvalidations | None = None,
    ) -> None:
        self._db = db
        self._blobs = blobs
        # Every range request of a film asks for the same entry: with ``invalidations``
        # it is answered from a copy in this process (a dict lookup, not a Redis round
        # trip) until the api or the scheduler invalidates it.
        self._cache: ReadThroughCache[StreamableVideo] = ReadThroughCache(
            kv,
            prefix=STREAM_CACHE_PREFIX,
            encode=_encode,
            decode=_decode,
            invalidations=invalidations,
            keep_local_copies=True,
        )

    async def find(self, video_id: str) -> StreamableVideo | None:
        if not video_id.isalnum() or len(video_id) > 64:  # noqa: PLR2004 - ids are 26 chars
            return None
        return await self._cache.get(video_id, lambda: self._load(video_id))

    async def _load(self, video_id: str) -> StreamableVideo | None:
        async with self._db.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        videos.c.content_hash,
                        videos.c.size,
                        videos.c.created_at,
                        videos.c.has_thumbnail,
                    ).where(videos.c.id == video_id, videos.c.deleted_at.is_(None))
                )
            ).first()
        if row is None:
            return None
        head = b""
        async for piece in self._blobs.read(content_blob_key(row.content_hash), length=SNIFF_BYTES):
            head += piece
        return StreamableVideo(
            video_id=video_id,
            content_hash=row.content_hash,
            size=int(row.size),
            modified=row.created_at,
            media_type=sniff_media_type(head),
            has_thumbnail=bool(row.has_thumbnail),
        )
