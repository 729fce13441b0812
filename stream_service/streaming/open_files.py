"""Open files of local blobs, kept between range requests.

A player asks for a film one range at a time, and many viewers watch the same films: on
the local disk every range used to open the blob (a hop to a worker thread and back,
≈ 10% of a range request's CPU) and close it again. Blobs are immutable once stored (a
content-addressed file is only ever replaced by the same bytes), so an open descriptor
stays right for as long as the file exists; the cache keeps the most recently used ones.

What keeps it honest:

- on every hit, ``fstat`` (no disk I/O) checks the file still has a name: a blob deleted
  or replaced since is dropped and opened again by path (or reported missing);
- a descriptor is closed only once no request is using it (leases are counted);
- at most ``capacity`` are kept, and one idle for ``max_idle`` seconds is closed by a
  periodic sweep, so a blob the collector removed does not keep its disk space for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path

from shared.blobs import BlobStore

DEFAULT_CAPACITY = 64
DEFAULT_MAX_IDLE = 30.0


@dataclass(slots=True)
class _Entry:
    file: BufferedReader
    path: Path
    users: int = 0
    last_used: float = 0.0
    dropped: bool = False


class OpenBlobFiles:
    """Open read-only files of the local blobs of ``blobs``, by blob key."""

    def __init__(
        self,
        blobs: BlobStore,
        *,
        capacity: int = DEFAULT_CAPACITY,
        max_idle: float = DEFAULT_MAX_IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._blobs = blobs
        self._capacity = capacity
        self._max_idle = max_idle
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def is_local(self, key: str) -> bool:
        return key in self._entries or self._blobs.local_path(key) is not None

    @contextlib.asynccontextmanager
    async def lease(self, key: str) -> AsyncIterator[BufferedReader]:
        """The blob's open file for the duration of the block (shared: read it with
        explicit offsets only). ``FileNotFoundError`` if the blob has no file."""
        entry = self._entries.get(key)
        if entry is not None and not _still_named(entry.file):
            self._drop(key, entry)
            entry = None
        if entry is None:
            path = self._blobs.local_path(key)
            if path is None:
                raise FileNotFoundError(f"blob {key!r} is not on the local disk")
            file = await _open(path)
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(file=file, path=path)
                self._entries[key] = entry
            else:
                file.close()  # another request opened it meanwhile
        self._entries.move_to_end(key)
        entry.users += 1
        try:
            yield entry.file
        finally:
            entry.users -= 1
            entry.last_used = self._clock()
            if entry.dropped and entry.users == 0:
                entry.file.close()
            self._trim()

    def sweep(self) -> None:
        """Closes the files nobody used for ``max_idle`` seconds."""
        horizon = self._clock() - self._max_idle
        for key, entry in list(self._entries.items()):
            if entry.users == 0 and entry.last_used < horizon:
                self._drop(key, entry)

    def close(self) -> None:
        for key, entry in list(self._entries.items()):
            self._drop(key, entry)

    def __len__(self) -> int:
        return len(self._entries)

    def _trim(self) -> None:
        while len(self._entries) > self._capacity:
            key, entry = next(iter(self._entries.items()))
            self._drop(key, entry)

    def _drop(self, key: str, entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            del self._entries[key]
        entry.dropped = True
        if entry.users == 0:
            entry.file.close()


def _still_named(file: BufferedReader) -> bool:
    """Whether the open file still has a name on disk (not deleted, not replaced)."""
    try:
        return os.fstat(file.fileno()).st_nlink > 0
    except (OSError, ValueError):
        return False


async def _open(path: Path) -> BufferedReader:
    """``path`` opened in a thread; if the caller is cancelled meanwhile (the client hung
    up), the file is closed once the thread has opened it rather than leaked."""
    opening = asyncio.ensure_future(asyncio.to_thread(path.open, "rb"))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise


def _close_opened(opening: asyncio.Future[BufferedReader]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


async def sweep_periodically(files: OpenBlobFiles, interval: float) -> None:
    """Runs ``files.sweep`` every ``interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        files.sweep()
