"""The local-disk blob store: files under one root folder, renamed into place when whole."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
import stat as stat_module
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Protocol, TypeVar, runtime_checkable

from shared.blobs.port import (
    CHUNK_SIZE,
    BlobInfo,
    BlobNotFoundError,
    BlobStoreUnavailableError,
    BlobTooLargeError,
    InvalidBlobKeyError,
    validate_key,
    validate_prefix,
)

T = TypeVar("T")

# Names starting with a dot are never keys (the rule in ``validate_key``), so temporary
# files can use them without ever colliding with a blob or showing up in ``list``.
_TEMP_PREFIX = ".tmp-"
# Incoming pieces are gathered (by reference, not copied) into slices this large, each
# one ``writev`` in the I/O pool while the next slice is gathered: 2 MiB makes the
# thread hop small, and two slices (one filling, one written) keep memory flat.
WRITE_SLICE_BYTES = 2 * 1024 * 1024
# Below Linux's IOV_MAX (1024): a source of tiny pieces flushes by count instead.
_MAX_SLICE_PIECES = 512


@runtime_checkable
class Sha256Source(Protocol):
    """A byte source that computes the SHA-256 of exactly what it yields (an upload's
    chunk, checked against its ``X-Chunk-SHA256`` on the way). ``write`` takes that digest
    instead of hashing every byte a second time; it is read once the source is exhausted.
    """

    def sha256_hexdigest(self) -> str: ...


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
        hashed_by_source = isinstance(chunks, Sha256Source)
        writer = await self._acquire(
            _TempWriter.open, key, path, not hashed_by_source, release=_TempWriter.discard
        )
        try:
            await self._pour(writer, chunks, max_bytes)
            modified = await self._io(writer.commit)
        except BaseException:
            await self._io(writer.discard)
            raise
        digest = chunks.sha256_hexdigest() if isinstance(chunks, Sha256Source) else writer.sha256()
        return BlobInfo(key=key, size=writer.size, sha256=digest, modified=modified)

    async def read(
        self, key: str, *, offset: int = 0, length: int | None = None, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        if offset < 0 or (length is not None and length < 0) or chunk_size <= 0:
            raise ValueError("offset and length must be ≥ 0, chunk_size > 0")
        path = self._path(key)
        try:
            file = await self._acquire(_open_for_reading, path, offset, release=_close)
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
        # Not hashed: the port's contract leaves ``sha256`` None here (see its docstring).
        writer = await self._acquire(
            _TempWriter.open, target_key, path, False, release=_TempWriter.discard
        )
        try:
            for part_key, part_path in zip(part_keys, part_paths, strict=True):
                await self._append(writer, part_key, part_path)
            modified = await self._io(writer.commit)
        except BaseException:
            await self._io(writer.discard)
            raise
        return BlobInfo(key=target_key, size=writer.size, modified=modified)

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        validate_prefix(prefix)
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

    async def abort_stale_multipart_uploads(self, older_than: timedelta) -> int:
        # A write here is one temporary file; nothing outlives a failed write but the
        # file of a killed process, which ``list`` never shows.
        return 0

    async def close(self) -> None:
        # Waits for pieces in flight (milliseconds each) so no thread outlives the store.
        await asyncio.to_thread(self._executor.shutdown)

    # -- helpers ---------------------------------------------------------------------

    async def _pour(
        self, writer: _TempWriter, chunks: AsyncIterable[bytes], max_bytes: int | None
    ) -> None:
        # Pieces are gathered by reference into WRITE_SLICE_BYTES slices, and one slice is
        # written in the pool while the next one arrives (one write in flight at most, so
        # memory stays at two slices). Only immutable ``bytes`` are kept by reference: any
        # other buffer is copied, since its owner may refill it once we ask for more.
        loop = asyncio.get_running_loop()
        in_flight: asyncio.Future[None] | None = None
        pending: list[bytes] = []
        pending_bytes = 0
        poured = 0
        try:
            async for chunk in chunks:
                poured += len(chunk)
                if max_bytes is not None and poured > max_bytes:
                    raise BlobTooLargeError(
                        f"The blob is larger than the limit of {max_bytes} bytes."
                    )
                if not chunk:
                    continue
                pending.append(chunk if type(chunk) is bytes else bytes(chunk))
                pending_bytes += len(chunk)
                if pending_bytes >= WRITE_SLICE_BYTES or len(pending) >= _MAX_SLICE_PIECES:
                    if in_flight is not None:
                        await _finish_in_thread(in_flight)
                    in_flight = loop.run_in_executor(self._executor, writer.write_pieces, pending)
                    pending, pending_bytes = [], 0
            if in_flight is not None:
                await _finish_in_thread(in_flight)
            if pending:
                await self._io(writer.write_pieces, pending)
        finally:
            if in_flight is not None:
                # Never leave a thread writing to a file the caller is about to discard.
                await _settle(in_flight)

    async def _append(self, writer: _TempWriter, key: str, path: Path) -> None:
        try:
            part = await self._acquire(_open_for_reading, path, 0, release=_close)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFoundError(f"No blob {key!r}.") from None
        try:
            # The kernel copies (copy_file_range: no bytes through Python).
            size = os.fstat(part.fileno()).st_size
            await self._io(writer.copy_part, part.fileno(), size)
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
        return await _finish_in_thread(future)

    async def _acquire(
        self, function: Callable[..., T], *args: object, release: Callable[[T], None]
    ) -> T:
        """``_io`` for a ``function`` that opens something: if the caller is cancelled
        while the thread opens it, it is released once open instead of leaked (a client
        hanging up, a shutdown cancelling a job)."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await _settle(future)
            if not future.cancelled() and future.exception() is None:
                # Best effort: the caller is unwinding with its cancellation, which an
                # error here must not replace.
                with contextlib.suppress(OSError):
                    release(future.result())
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


async def _finish_in_thread(future: asyncio.Future[T]) -> T:
    """The result of a job in the I/O pool.

    If the caller is cancelled, waits for the thread to finish its piece before passing
    the cancellation on: a file must never be closed or removed under a thread still
    writing to it.
    """
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await _settle(future)
        raise


async def _settle(future: asyncio.Future[T]) -> None:
    """Waits, through any cancellation, until a job in the pool is over; its outcome is
    dropped (the caller is already unwinding with an exception of its own)."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it as forgotten


class _TempWriter:
    """A temporary file beside its target, renamed into place; what ``write_pieces``
    writes is hashed when ``hashed`` (``write`` of a source that does not hash what it
    yields), never what ``copy_part`` copies."""

    def __init__(
        self, key: str, target: Path, temp: Path, file: IO[bytes], *, hashed: bool
    ) -> None:
        self.key = key
        self.target = target
        self.temp = temp
        self.file = file
        self.size = 0
        self._hash = hashlib.sha256() if hashed else None

    @classmethod
    def open(cls, key: str, target: Path, hashed: bool = True) -> _TempWriter:
        temp = target.with_name(f"{_TEMP_PREFIX}{secrets.token_hex(8)}")
        for _ in range(3):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                # Unbuffered: slices go to the OS as they are, with no extra copy.
                return cls(key, target, temp, temp.open("xb", buffering=0), hashed=hashed)
            except FileNotFoundError:
                # A concurrent delete removed the freshly made (still empty) folder.
                continue
            except (FileExistsError, NotADirectoryError) as exc:
                # A path segment is already a blob: "a/b" cannot hold "a/b/c" on disk.
                raise InvalidBlobKeyError(
                    f"The blob key {key!r} runs through an existing blob."
                ) from exc
        raise FileNotFoundError(errno.ENOENT, "the blob's folder keeps vanishing", str(target))

    def write_pieces(self, pieces: list[bytes]) -> None:
        """Appends ``pieces`` (one ``writev``, repeated only if the OS takes part of it)."""
        if self._hash is not None:
            for piece in pieces:
                self._hash.update(piece)
        views = [memoryview(piece) for piece in pieces]
        while views:
            written = os.writev(self.file.fileno(), views)
            self.size += written
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]

    def copy_part(self, source: int, size: int) -> None:
        """Appends ``size`` bytes of the file ``source`` from its start, in the kernel."""
        copied = 0
        while copied < size:
            try:
                step = os.copy_file_range(
                    source, self.file.fileno(), size - copied, copied, self.size + copied
                )
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                step = self._copy_through_memory(source, copied, size - copied)
            if step == 0:
                break  # the part is shorter than it was: take what is there
            copied += step
        self.size += copied

    def _copy_through_memory(self, source: int, offset: int, length: int) -> int:
        data = os.pread(source, min(length, CHUNK_SIZE), offset)
        written = 0
        while written < len(data):
            written += os.pwrite(self.file.fileno(), data[written:], self.size + offset + written)
        return len(data)

    def sha256(self) -> str | None:
        return None if self._hash is None else self._hash.hexdigest()

    def commit(self) -> datetime:
        # One flush to disk per blob (an upload's chunk is durable before its 204), not
        # per write; fdatasync, since the size it must persist is all the inode holds
        # that matters (the mtime below is read back, not needed to be durable first).
        os.fdatasync(self.file.fileno())
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


def _close(file: IO[bytes]) -> None:
    file.close()


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
