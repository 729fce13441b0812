"""The blob store port: where video files and upload chunks live.

``BlobStore`` is the protocol; ``open_blob_store(url)`` picks the adapter:

- ``file:///abs/path`` or ``file://./relative``: ``LocalBlobStore``, files under one root.
- ``s3://bucket?endpoint=...``: not built yet. The protocol is shaped for it: ``write``
  is one PUT (or a multipart upload of its chunks), ``read`` a ranged GET,
  ``concatenate`` a multipart upload whose parts are server-side copies of the part
  blobs (upload chunks are ≥ 8 MiB, above S3's 5 MiB minimum part), and ``local_path``
  returns None so callers stream instead of using sendfile.

Keys are relative, slash-separated names (``blobs/ab/abcdef...``, ``uploads/<id>/00001``)
checked by ``validate_key`` in every adapter, so that an id taken from a request can never
name anything outside the store. Writes are atomic: a blob is either all there or absent,
whatever the writer's source does.

Errors, all ``AppError`` so that one reaching a client becomes the right problem document:

    InvalidBlobKeyError        400  the key breaks the naming rule
    BlobNotFoundError          404  no blob under that key
    BlobTooLargeError          413  a write went past its ``max_bytes``
    BlobStoreUnavailableError  503  the store cannot be used (``ping``)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat as stat_module
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

from shared.errors import (
    BadRequestError,
    ConfigError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)

__all__ = [
    "CHUNK_SIZE",
    "BlobInfo",
    "BlobNotFoundError",
    "BlobStore",
    "BlobStoreUnavailableError",
    "BlobTooLargeError",
    "InvalidBlobKeyError",
    "LocalBlobStore",
    "open_blob_store",
    "validate_key",
]

T = TypeVar("T")

MIB = 1024 * 1024
# The unit of every piece of file I/O: large enough that the thread hop costs little,
# small enough that memory per stream stays flat and the event loop is never held long.
CHUNK_SIZE = MIB

# S3's limit on key length, and the usual file-system limit on one name.
MAX_KEY_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._/-]*")
# Names starting with a dot are never keys (the rule above), so temporary files can use
# them without ever colliding with a blob or showing up in ``list``.
_TEMP_PREFIX = ".tmp-"


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

    ``sha256`` (lower-case hex) is set by ``write`` and ``concatenate``, which see every
    byte; ``stat`` leaves it None rather than read the blob back.
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


def _validate_prefix(prefix: str) -> str:
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
        missing.
        """
        ...

    def list(self, prefix: str = "") -> AsyncIterator[str]:
        """Keys that start with ``prefix`` (a string prefix, as in S3), in sorted order."""
        ...

    async def ping(self) -> None:
        """Returns if the store is usable; raises ``BlobStoreUnavailableError`` if not."""
        ...

    async def close(self) -> None: ...


class LocalBlobStore:
    """Blobs as files under ``root``; the key is the path relative to it.

    File I/O runs in a thread pool of the store's own, in pieces of ``CHUNK_SIZE``, so
    disk work never holds the event loop and never starves other users of the default
    executor (password hashing, for one).
    """

    def __init__(self, root: Path, *, io_threads: int = 16) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(io_threads, thread_name_prefix="blob-io")

    # -- the protocol ----------------------------------------------------------------

    async def write(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None
    ) -> BlobInfo:
        path = self._path(key)
        writer = await self._io(_TempWriter.open, key, path)
        try:
            await self._pour(writer, chunks, max_bytes)
            modified = await self._io(writer.commit)
        except BaseException:
            await self._io(writer.discard)
            raise
        return BlobInfo(key=key, size=writer.size, sha256=writer.sha256(), modified=modified)

    async def read(
        self, key: str, *, offset: int = 0, length: int | None = None, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        if offset < 0 or (length is not None and length < 0) or chunk_size <= 0:
            raise ValueError("offset and length must be ≥ 0, chunk_size > 0")
        path = self._path(key)
        try:
            file = await self._io(_open_for_reading, path, offset)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFoundError(f"No blob {key!r}.") from None
        try:
            remaining = length
            while remaining is None or remaining > 0:
                size = chunk_size if remaining is None else min(chunk_size, remaining)
                piece = await self._io(file.read, size)
                if not piece:
                    return
                if remaining is not None:
                    remaining -= len(piece)
                yield piece
        finally:
            # Closing a file opened for reading does not block; no thread hop needed.
            file.close()

    async def stat(self, key: str) -> BlobInfo | None:
        path = self._path(key)
        try:
            result = await self._io(os.stat, path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat_module.S_ISREG(result.st_mode):
            return None
        modified = datetime.fromtimestamp(result.st_mtime, UTC)
        return BlobInfo(key=key, size=result.st_size, modified=modified)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    async def delete(self, key: str) -> bool:
        return await self._io(self._delete, self._path(key))

    async def concatenate(self, target_key: str, part_keys: Sequence[str]) -> BlobInfo:
        path = self._path(target_key)
        part_paths = [self._path(part) for part in part_keys]
        writer = await self._io(_TempWriter.open, target_key, path)
        try:
            for part_key, part_path in zip(part_keys, part_paths, strict=True):
                await self._append(writer, part_key, part_path)
            modified = await self._io(writer.commit)
        except BaseException:
            await self._io(writer.discard)
            raise
        return BlobInfo(key=target_key, size=writer.size, sha256=writer.sha256(), modified=modified)

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        _validate_prefix(prefix)
        folder, _, _ = prefix.rpartition("/")
        # Depth first, one folder per thread hop, siblings sorted with a folder as
        # "name/": that yields keys in plain string order, the order S3 lists in.
        pending: list[tuple[str, bool]] = [(folder, True)]
        while pending:
            relative, is_folder = pending.pop()
            if not is_folder:
                yield relative
                continue
            entries = await self._io(_scan_folder, self.root / relative)
            children = [
                (f"{relative}/{name}" if relative else name, child_is_folder)
                for name, child_is_folder in entries
            ]
            pending.extend(
                sorted(
                    (child for child in children if _may_hold_prefix(*child, prefix)),
                    key=lambda child: child[0] + "/" if child[1] else child[0],
                    reverse=True,  # the stack pops the smallest first
                )
            )

    async def ping(self) -> None:
        try:
            usable = await self._io(_is_writable_folder, self.root)
        except OSError as exc:
            raise BlobStoreUnavailableError(f"The blob store is unusable: {exc}") from exc
        if not usable:
            raise BlobStoreUnavailableError("The blob store's folder is missing or read-only.")

    async def close(self) -> None:
        # Waits for pieces in flight (milliseconds each) so no thread outlives the store.
        await asyncio.to_thread(self._executor.shutdown)

    # -- helpers ---------------------------------------------------------------------

    async def _pour(
        self, writer: _TempWriter, chunks: AsyncIterable[bytes], max_bytes: int | None
    ) -> None:
        # Small network reads are gathered into CHUNK_SIZE pieces: one thread hop each.
        # The buffer goes to the thread as is; _io returns only once the thread is done.
        buffer = bytearray()
        async for chunk in chunks:
            if max_bytes is not None and writer.size + len(buffer) + len(chunk) > max_bytes:
                raise BlobTooLargeError(f"The blob is larger than the limit of {max_bytes} bytes.")
            buffer += chunk
            if len(buffer) >= CHUNK_SIZE:
                await self._io(writer.write, buffer)
                buffer.clear()
        if buffer:
            await self._io(writer.write, buffer)

    async def _append(self, writer: _TempWriter, key: str, path: Path) -> None:
        try:
            part = await self._io(_open_for_reading, path, 0)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFoundError(f"No blob {key!r}.") from None
        try:
            while await self._io(writer.copy_piece, part):
                pass
        finally:
            part.close()

    def _path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        # The key rule already forbids every way out; this is the belt to its braces.
        if not Path(os.path.normpath(path)).is_relative_to(self.root):
            raise InvalidBlobKeyError(f"{key!r} is not a valid blob key.")
        return path

    async def _io(self, function: Callable[..., T], *args: object) -> T:
        """Runs ``function`` in the I/O pool.

        If the caller is cancelled, waits for the thread to finish its piece before
        passing the cancellation on: a file must never be closed or removed under a
        thread still writing to it.
        """
        future = asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            raise

    def _delete(self, path: Path) -> bool:
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        # Drop folders emptied by the removal (an upload's chunk folder), up to the root.
        # A writer racing into one of them re-creates it (see _TempWriter.open).
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return True


class _TempWriter:
    """A temporary file beside its target, hashed as written, renamed into place."""

    def __init__(self, key: str, target: Path, temp: Path, file: IO[bytes]) -> None:
        self.key = key
        self.target = target
        self.temp = temp
        self.file = file
        self.size = 0
        self._hash = hashlib.sha256()

    @classmethod
    def open(cls, key: str, target: Path) -> _TempWriter:
        temp = target.with_name(f"{_TEMP_PREFIX}{secrets.token_hex(8)}")
        for _ in range(3):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                return cls(key, target, temp, temp.open("xb"))
            except FileNotFoundError:
                # A concurrent delete removed the freshly made (still empty) folder.
                continue
            except (FileExistsError, NotADirectoryError) as exc:
                # A path segment is already a blob: "a/b" cannot hold "a/b/c" on disk.
                raise InvalidBlobKeyError(
                    f"The blob key {key!r} runs through an existing blob."
                ) from exc
        raise FileNotFoundError(errno.ENOENT, "the blob's folder keeps vanishing", str(target))

    def write(self, data: bytes | bytearray) -> None:
        self.file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def copy_piece(self, source: IO[bytes]) -> bool:
        data = source.read(CHUNK_SIZE)
        if data:
            self.write(data)
        return bool(data)

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> datetime:
        self.file.flush()
        os.fsync(self.file.fileno())
        # Taken before the rename (which keeps it): afterwards a concurrent delete may win.
        modified = os.fstat(self.file.fileno()).st_mtime
        self.file.close()
        try:
            self.temp.replace(self.target)
        except IsADirectoryError as exc:
            raise InvalidBlobKeyError(
                f"The blob key {self.key!r} is a folder of other blobs."
            ) from exc
        # The rename is durable only once the folder itself is on disk.
        _fsync_folder(self.target.parent)
        return datetime.fromtimestamp(modified, UTC)

    def discard(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


def _open_for_reading(path: Path, offset: int) -> IO[bytes]:
    # Unbuffered: reads go straight to the OS in the size asked for, with no extra copy.
    file = path.open("rb", buffering=0)
    if not stat_module.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise IsADirectoryError(errno.EISDIR, "not a blob", str(path))
    file.seek(offset)
    return file


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _scan_folder(folder: Path) -> list[tuple[str, bool]]:
    """(name, is_folder) of the visible entries in ``folder``; empty if it is gone."""
    try:
        with os.scandir(folder) as entries:
            return [
                (entry.name, entry.is_dir(follow_symlinks=False))
                for entry in entries
                if not entry.name.startswith(".")
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _may_hold_prefix(relative: str, is_folder: bool, prefix: str) -> bool:
    if is_folder:
        folder = relative + "/"
        return folder.startswith(prefix) or prefix.startswith(folder)
    return relative.startswith(prefix)


def _is_writable_folder(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def open_blob_store(url: str) -> BlobStore:
    """The store for ``url``: ``file:///abs/path`` or ``file://./relative`` (to the cwd)."""
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
        raise ConfigError("VOD_BLOB_URL", "s3:// blob stores are not supported yet")
    raise ConfigError("VOD_BLOB_URL", f"scheme {parts.scheme or '(none)'!r} is not file or s3")
