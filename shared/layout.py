"""Where things live: blob keys and Redis keys that more than one service touches.

stream_service writes uploads and blobs; the scheduler sweeps and collects them. Both
build every key through these functions, so the layout can change in one place.
"""

from __future__ import annotations

import re

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_UPLOAD_ID_RE = re.compile(r"^[0-9A-Za-z]{1,64}$")
CHUNKS_PREFIX = "uploads/"


def content_blob_key(content_hash: str) -> str:
    """A stored file, once per content hash: ``blobs/ab/cd/abcd...``."""
    if not _HASH_RE.match(content_hash):
        raise ValueError(f"not a content hash: {content_hash!r}")
    return f"blobs/{content_hash[:2]}/{content_hash[2:4]}/{content_hash}"


def thumbnail_key(content_hash: str) -> str:
    """The JPEG made from a stored file (same file, same thumbnail)."""
    return content_blob_key(content_hash).replace("blobs/", "thumbnails/", 1) + ".jpg"


def upload_prefix(upload_id: str) -> str:
    """Every chunk of one upload lives below this prefix."""
    if not _UPLOAD_ID_RE.match(upload_id):
        raise ValueError(f"not an upload id: {upload_id!r}")
    return f"{CHUNKS_PREFIX}{upload_id}/"


def chunk_key(upload_id: str, index: int) -> str:
    """One received chunk; zero-padded so a listing sorts in file order."""
    return f"{upload_prefix(upload_id)}{index:06d}"


def upload_state_key(upload_id: str) -> str:
    """The Redis hash of an upload in progress; when it expires, the upload is abandoned."""
    return f"upload:{upload_id}"


# An upload in Redis: the hash at upload_state_key (owner, sizes, content hash, state
# "uploading" or "complete", expiry), the set of received indices beside it, and a lock
# only while one replica assembles the file. The hash outlives completion by its TTL (the
# database keeps the finished upload for good); a sweeper may delete the chunks of any
# upload whose hash no longer exists.


def is_upload_id(upload_id: str) -> bool:
    """Whether ``upload_id`` could name an upload (checked before it reaches any key)."""
    return bool(_UPLOAD_ID_RE.match(upload_id))


def upload_received_key(upload_id: str) -> str:
    """The Redis set of the chunk indices received so far; it expires with the upload."""
    return f"{upload_state_key(upload_id)}:received"


def upload_lock_key(upload_id: str) -> str:
    """The Redis lease held by the one replica assembling an upload (a token, with a TTL)."""
    return f"{upload_state_key(upload_id)}:lock"


def upload_events_channel(upload_id: str) -> str:
    """Pub/sub channel told when a completion attempt ends, so waiting callers look again."""
    return f"{upload_state_key(upload_id)}:events"


# The read-through cache of one video's public JSON (shared.cache.ReadThroughCache with
# this prefix). Whoever changes a video row (api writes, the scheduler's media results)
# deletes video_cache_key(id) after committing.
VIDEO_CACHE_PREFIX = "video"


def video_cache_key(video_id: str) -> str:
    return f"cache:{VIDEO_CACHE_PREFIX}:{video_id}"


# stream_service's own cached view of a video (hash, size, media type). The api deletes
# it together with video_cache_key when a video changes or goes, so a deleted video stops
# streaming at once.
STREAM_CACHE_PREFIX = "stream"


def stream_cache_key(video_id: str) -> str:
    return f"cache:{STREAM_CACHE_PREFIX}:{video_id}"


# Danmaku in Redis: one sorted set per video and 6-minute segment of its timeline. The api
# writes and reads them; the scheduler removes them all when the video is deleted.
DANMAKU_BUCKET_MS = 6 * 60 * 1000
# The latest offset a danmaku may have (24 h), so a video's buckets are a known, short list.
MAX_DANMAKU_OFFSET_MS = 24 * 60 * 60 * 1000


def danmaku_bucket_of(offset_ms: int) -> int:
    return offset_ms // DANMAKU_BUCKET_MS


def danmaku_bucket_key(video_id: str, bucket: int) -> str:
    return f"danmaku:{video_id}:{bucket}"


def danmaku_bucket_keys(video_id: str) -> list[str]:
    """Every bucket key a video's danmaku can occupy (241 keys: offsets 0 to 24 h)."""
    last = danmaku_bucket_of(MAX_DANMAKU_OFFSET_MS)
    return [danmaku_bucket_key(video_id, bucket) for bucket in range(last + 1)]
