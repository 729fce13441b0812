"""Sending a byte range of a blob: sendfile for local files, streamed reads otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from io import BufferedReader
from pathlib import Path

from aiohttp import web

from shared.blobs import BlobStore

# Fallback read size when sendfile is not available (TLS, uvloop): large pieces keep the
# per-chunk overhead small (PERF-NOTES: 2 MiB recovered most of sendfile's speed).
FALLBACK_CHUNK = 2 * 1024 * 1024
# sendfile is handed the range in slices of this size so the bytes-sent counter moves
# while a long range is sent, and stops when the client stops reading (each slice is
# one loop.sendfile call: a few microseconds of overhead per 8 MiB).
SENDFILE_SLICE = 8 * 1024 * 1024


async def send_range(
    request: web.Request,
    response: web.StreamResponse,
    *,
    blobs: BlobStore,
    key: str,
    start: int,
    length: int,
    on_bytes: Callable[[int], None],
) -> None:
    """Write ``length`` bytes of ``key`` from ``start`` to the prepared ``response``."""
    path = blobs.local_path(key)
    if path is None or not await _sendfile(request, path, start, length, on_bytes):
        async for piece in blobs.read(key, offset=start, length=length, chunk_size=FALLBACK_CHUNK):
            await response.write(piece)
            on_bytes(len(piece))
    await response.write_eof()


async def _sendfile(
    request: web.Request, path: Path, start: int, length: int, on_bytes: Callable[[int], None]
) -> bool:
    """The kernel copies file to socket; False where the transport cannot (then read)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client went away")
    loop = asyncio.get_running_loop()
    handle = await _open(path)
    try:
        offset, end = start, start + length
        while offset < end:
            count = min(SENDFILE_SLICE, end - offset)
            # asyncio flushes what aiohttp buffered (the headers) before handing over,
            # and waits for the socket to take each slice: a slow reader pauses us here.
            await loop.sendfile(transport, handle, offset, count, fallback=False)
            offset += count
            on_bytes(count)
    except asyncio.SendfileNotAvailableError:
        if offset == start:
            return False  # raised before a byte is sent: reading instead is safe
        raise
    finally:
        # Not in a thread: closing a file opened for reading does not block, and a
        # cancelled await would skip a close still queued for the thread pool (a leak).
        handle.close()
    return True


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
