"""Media processing: probe a stored file's duration and make its JPEG thumbnail (PyAV).

Once per content hash: the result goes on the file's ``blobs`` row (``media_status``,
``duration_ms``, ``has_thumbnail``, ``failure_reason``) and the thumbnail to
``thumbnail_key(content_hash)``; every video of that file is then marked ``ready`` (or
``failed``) and its cached JSON dropped. A video published later copies the row's result
when it is created, so it never waits for an event that has already gone by.

A file PyAV cannot read is a normal outcome, not a poison message: its videos are marked
``failed`` with the reason and the message is acked. Decoding runs in a worker thread
(PyAV releases the GIL while FFmpeg works) so the event loop keeps serving.

The thumbnail is the frame at the keyframe at or before 10% of the duration (the first
keyframe when the duration is unknown), scaled to ``THUMBNAIL_WIDTH`` pixels wide and
encoded with FFmpeg's MJPEG encoder, so no imaging library is needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from sqlalchemy import select, update

from shared.blobs import BlobStore
from shared.cache import forget_cached
from shared.db import Database
from shared.db.schema import blobs, videos
from shared.kv import KeyValueStore
from shared.layout import VIDEO_CACHE_PREFIX, content_blob_key, thumbnail_key

logger = logging.getLogger(__name__)

READY = "ready"
FAILED = "failed"
THUMBNAIL_WIDTH = 320
THUMBNAIL_AT = 0.1  # of the duration
MAX_REASON_CHARS = 500
# Frames larger than this are refused rather than scaled: a hostile header must not make
# the scheduler allocate gigabytes.
MAX_DIMENSION = 16384
_MICROSECONDS = 1_000_000
# Demuxers that render any text as "video" (ANSI art); blob files have no extension, so
# FFmpeg does not pick them by name, but a text file must never come out "ready".
TEXT_FORMATS = frozenset({"tty"})


@dataclass(frozen=True, slots=True)
class MediaInfo:
    status: str  # READY or FAILED
    duration_ms: int | None = None
    thumbnail: bytes | None = None
    failure_reason: str | None = None


def probe_file(path: Path, *, width: int = THUMBNAIL_WIDTH) -> MediaInfo:
    """Duration and thumbnail of the media file at ``path``; blocking (run it in a thread)."""
    try:
        with av.open(str(path)) as container:
            if container.format.name in TEXT_FORMATS:
                return MediaInfo(FAILED, failure_reason="a text file, not audio or video")
            if not container.streams.video and not container.streams.audio:
                return MediaInfo(FAILED, failure_reason="no audio or video stream found")
            duration_ms = _duration_ms(container)
            thumbnail = None
            if container.streams.video:
                thumbnail = _thumbnail(container, duration_ms, width)
            return MediaInfo(READY, duration_ms=duration_ms, thumbnail=thumbnail)
    except (av.FFmpegError, ValueError, StopIteration) as exc:
        reason = f"not a media file FFmpeg can decode: {type(exc).__name__}: {exc}"
        return MediaInfo(FAILED, failure_reason=reason[:MAX_REASON_CHARS])


def _duration_ms(container: av.container.InputContainer) -> int | None:
    if container.duration is not None and container.duration > 0:
        return int(container.duration * 1000 // _MICROSECONDS)
    for stream in (*container.streams.video, *container.streams.audio):
        if stream.duration is not None and stream.time_base is not None:
            return int(stream.duration * stream.time_base * 1000)
    return None


def _thumbnail(
    container: av.container.InputContainer, duration_ms: int | None, width: int
) -> bytes:
    stream = container.streams.video[0]
    if duration_ms and stream.time_base is not None:
        target = int(Fraction(duration_ms, 1000) * THUMBNAIL_AT / stream.time_base)
        try:
            container.seek(target, stream=stream)
        except av.FFmpegError:
            container.seek(0)
    frame = next(container.decode(stream))
    if frame.width > MAX_DIMENSION or frame.height > MAX_DIMENSION or not frame.width:
        raise ValueError(f"frame of {frame.width}x{frame.height} pixels")
    height = max(2, round(frame.height * width / frame.width / 2) * 2)
    small = frame.reformat(width=width, height=height, format="yuvj420p")
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width = width
    encoder.height = height
    encoder.pix_fmt = "yuvj420p"
    encoder.time_base = Fraction(1, 25)
    packets = [*encoder.encode(small), *encoder.encode(None)]
    return b"".join(bytes(packet) for packet in packets)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


class MediaProcessor:
    def __init__(
        self,
        db: Database,
        kv: KeyValueStore,
        blobs: BlobStore,
        *,
        thumbnail_width: int = THUMBNAIL_WIDTH,
    ) -> None:
        self._db = db
        self._kv = kv
        self._blobs = blobs
        self._width = thumbnail_width

    async def process(self, content_hash: str) -> MediaInfo | None:
        """Probe the file once, record the result and apply it to its videos.

        None when there is no such blob (collected meanwhile): nothing to do.
        """
        async with self._db.connect() as conn:
            row = (
                (await conn.execute(select(blobs).where(blobs.c.content_hash == content_hash)))
                .mappings()
                .first()
            )
        if row is None:
            logger.info("media: no blob %s any more; nothing to process", content_hash)
            return None
        if row["media_status"] is not None:
            # Probed before (the same bytes uploaded again): reuse the result.
            info = MediaInfo(
                row["media_status"],
                duration_ms=row["duration_ms"],
                failure_reason=row["failure_reason"],
            )
            has_thumbnail = bool(row["has_thumbnail"])
        else:
            info = await self.probe(content_hash)
            if info.thumbnail is not None:
                await self._blobs.write(thumbnail_key(content_hash), _one(info.thumbnail))
            has_thumbnail = info.thumbnail is not None
        await self.apply(content_hash, info, has_thumbnail=has_thumbnail)
        return info

    async def probe(self, content_hash: str) -> MediaInfo:
        key = content_blob_key(content_hash)
        path = self._blobs.local_path(key)
        if path is not None:
            return await asyncio.to_thread(probe_file, path, width=self._width)
        # A remote store: FFmpeg wants to seek, so the file comes down to a temporary one.
        handle, name = tempfile.mkstemp(prefix="vod-media-")
        try:
            with os.fdopen(handle, "wb") as file:
                async for chunk in self._blobs.read(key):
                    await asyncio.to_thread(file.write, chunk)
            return await asyncio.to_thread(probe_file, Path(name), width=self._width)
        finally:
            await asyncio.to_thread(Path(name).unlink, missing_ok=True)

    async def apply(self, content_hash: str, info: MediaInfo, *, has_thumbnail: bool) -> list[str]:
        """Record ``info`` on the blob row and every video of it; returns the videos' ids.

        The blob row is updated first: a video being created right now locks the same row
        (its reference count) in its own transaction, so either it commits first and this
        update of ``videos`` sees it, or it waits and copies the result from the row.
        """
        async with self._db.transaction() as conn:
            await conn.execute(
                update(blobs)
                .where(blobs.c.content_hash == content_hash)
                .values(
                    media_status=info.status,
                    duration_ms=info.duration_ms,
                    failure_reason=info.failure_reason,
                    has_thumbnail=has_thumbnail,
                )
            )
            video_ids = [
                r.id
                for r in await conn.execute(
                    select(videos.c.id).where(videos.c.content_hash == content_hash)
                )
            ]
            if video_ids:
                await conn.execute(
                    update(videos)
                    .where(videos.c.content_hash == content_hash)
                    .values(
                        status=info.status,
                        duration_ms=info.duration_ms,
                        failure_reason=info.failure_reason,
                        has_thumbnail=has_thumbnail,
                    )
                )
        if video_ids:
            await forget_cached(self._kv, VIDEO_CACHE_PREFIX, video_ids)
        logger.info(
            "media: %s is %s (%d videos)",
            content_hash,
            info.status,
            len(video_ids),
            extra={"content_hash": content_hash},
        )
        return video_ids
