"""The blob store port: where video files and upload chunks live.

``BlobStore`` is the protocol; ``open_blob_store(url)`` picks the adapter:

- ``file:///abs/path`` or ``file://./relative``: ``LocalBlobStore``, files under one root
  (``shared.blobs.local``). ``local_path`` gives the file, for sendfile.
- ``s3://bucket[/prefix]?endpoint=...&region=...``: ``S3BlobStore``, objects in an
  S3-compatible bucket (``shared.blobs.s3``, which documents the URL and credentials):
  ``write`` is one PUT or a multipart upload, ``read`` a ranged GET streamed through,
  ``concatenate`` a multipart upload whose parts are server-side copies of the part
  blobs (upload chunks are ≥ 8 MiB, above S3's 5 MiB minimum part), and ``local_path``
  returns None so callers stream instead of using sendfile.

Keys are relative, slash-separated names (``blobs/ab/abcdef...``, ``uploads/<id>/00001``)
checked by ``validate_key`` in every adapter, so that an id taken from a request can never
name anything outside the store. Writes are atomic: a blob is either all there or absent,
whatever the writer's source does. Both adapters pass one contract suite
(``tests/integration/test_blob_contract.py``).

Errors, all ``AppError`` so that one reaching a client becomes the right problem document:

    InvalidBlobKeyError        400  the key breaks the naming rule
    BlobNotFoundError          404  no blob under that key
    BlobTooLargeError          413  a write went past its ``max_bytes``
    BlobStoreUnavailableError  503  the store cannot be used (down, bucket missing, ...)
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared.blobs.local import LocalBlobStore
from shared.blobs.port import (
    CHUNK_SIZE,
    MAX_KEY_LENGTH,
    MAX_SEGMENT_LENGTH,
    MIB,
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    BlobStoreUnavailableError,
    BlobTooLargeError,
    InvalidBlobKeyError,
    validate_key,
    validate_prefix,
)
from shared.blobs.s3 import S3BlobStore
from shared.errors import ConfigError

__all__ = [
    "CHUNK_SIZE",
    "MAX_KEY_LENGTH",
    "MAX_SEGMENT_LENGTH",
    "MIB",
    "BlobInfo",
    "BlobNotFoundError",
    "BlobStore",
    "BlobStoreUnavailableError",
    "BlobTooLargeError",
    "InvalidBlobKeyError",
    "LocalBlobStore",
    "S3BlobStore",
    "open_blob_store",
    "validate_key",
    "validate_prefix",
]


def open_blob_store(url: str) -> BlobStore:
    """The store for ``url`` (see the module doc). Does no I/O but creating a local root.

    Raises ``ConfigError`` naming ``VOD_BLOB_URL`` for a URL it cannot use.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", ".", "localhost") or not parts.path:
            raise ConfigError(
                "VOD_BLOB_URL", "a file URL is file:///absolute/path or file://./relative/path"
            )
        path = unquote(parts.path)
        root = Path("." + path) if parts.netloc == "." else Path(path)
        return LocalBlobStore(root)
    if parts.scheme == "s3":
        return S3BlobStore.from_url(url)
    raise ConfigError("VOD_BLOB_URL", f"scheme {parts.scheme or '(none)'!r} is not file or s3")
