"""What every blob store adapter promises: the protocol, the errors and the key rules."""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from shared.errors import (
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)

MIB = 1024 * 1024
# The unit of every piece of file I/O: large enough that the thread hop costs little,
# small enough that memory per stream stays flat and the event loop is never held long.
CHUNK_SIZE = MIB

# S3's limit on key length, and the usual file-system limit on one name.
MAX_KEY_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._/-]*")


class InvalidBlobKeyError(BadRequestError):
    code = "invalid_blob_key"


class BlobNotFoundError(NotFoundError):
    code = "blob_not_found"


class BlobTooLargeError(PayloadTooLargeError):
    code = "blob_too_large"


class BlobStoreUnavailableError(ServiceUnavailableError):
    code = "blob_store_unavailable"


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobInfo:
    """What a store knows about one blob.

    ``sha256`` (lower-case hex) is set by ``write``, which sees every byte; ``stat`` and
    ``concatenate`` leave it None rather than read the blob back.
    """

    key: str
    size: int
    sha256: str | None = None
    modified: datetime | None = None


def validate_key(key: str) -> str:
    """Returns ``key`` if it is a valid blob key, else raises ``InvalidBlobKeyError``.

    A key is one or more ``/``-separated segments of ``[A-Za-z0-9._-]``; no segment is
    empty or starts with a dot (so no ``.`` or ``..``), and there is no leading ``/``.
    """
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidBlobKeyError(f"A blob key must be 1 to {MAX_KEY_LENGTH} characters.")
    for segment in key.split("/"):
        if len(segment) > MAX_SEGMENT_LENGTH or not _SEGMENT_RE.fullmatch(segment):
            raise InvalidBlobKeyError(f"{key!r} is not a valid blob key.")
    return key


def validate_prefix(prefix: str) -> str:
    """Returns ``prefix`` if it may start keys (see ``validate_key``), else raises."""
    # A prefix may end mid-segment ("uploads/ab") or with "/", but obeys the key rules
    # for every segment it completes.
    if len(prefix) > MAX_KEY_LENGTH or not _PREFIX_RE.fullmatch(prefix):
        raise InvalidBlobKeyError(f"{prefix!r} is not a valid blob key prefix.")
    complete = prefix.split("/")[:-1]
    if any(not _SEGMENT_RE.fullmatch(segment) for segment in complete) or prefix.startswith("."):
        raise InvalidBlobKeyError(f"{prefix!r} is not a valid blob key prefix.")
    return prefix


class BlobStore(Protocol):
    """Byte blobs under string keys. Every method validates its keys first."""

    async def write(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None
    ) -> BlobInfo:
        """Stores the bytes ``chunks`` yields under ``key``, replacing any blob there.

        Atomic: if ``chunks`` raises, or yields more than ``max_bytes`` (which raises
        ``BlobTooLargeError`` without reading further), nothing new is left behind.
        """
        ...

    def read(
        self, key: str, *, offset: int = 0, length: int | None = None, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        """Streams ``length`` bytes (all, if None) from ``offset``, in pieces ≤ ``chunk_size``.

        A range past the end is cut at the end (an ``offset`` at or past it yields
        nothing). Raises ``BlobNotFoundError`` on the first iteration if there is no blob.
        """
        ...

    async def stat(self, key: str) -> BlobInfo | None:
        """Size and modification time of ``key``, or None if there is no such blob."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The file holding ``key`` (it may not exist) for sendfile; None if not local."""
        ...

    async def delete(self, key: str) -> bool:
        """Removes ``key``; False if it was already absent."""
        ...

    async def concatenate(self, target_key: str, part_keys: Sequence[str]) -> BlobInfo:
        """Writes the parts, in the given order, as one blob under ``target_key``.

        Atomic like ``write``; the parts stay. Raises ``BlobNotFoundError`` if a part is
        missing. Returns the size (and modification time when known) with ``sha256``
        None, like ``stat``: the parts were checked as they arrived, and reading the whole
        blob back only to hash it cost a second pass over it (a full download on S3).
        """
        ...

    def list(self, prefix: str = "") -> AsyncIterator[str]:
        """Keys that start with ``prefix`` (a string prefix, as in S3), in sorted order."""
        ...

    async def ping(self) -> None:
        """Returns if the store is usable; raises ``BlobStoreUnavailableError`` if not."""
        ...

    async def abort_stale_multipart_uploads(self, older_than: timedelta) -> int:
        """Drops unfinished writes begun more than ``older_than`` ago; returns how many.

        A process killed mid-write can leave storage behind that no key names (an S3
        multipart upload keeps its parts, and is billed, until aborted). The scheduler's
        sweeper calls this; an adapter with nothing of the kind returns 0.
        """
        ...

    async def close(self) -> None: ...
