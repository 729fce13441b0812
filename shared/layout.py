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
