"""Sending a byte range of a blob: sendfile for local files, streamed reads otherwise."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_writer import StreamWriter

from shared.blobs import BlobStore
from shared.stall import StallGuard, stall_guard
from stream_service.streaming.open_files import OpenBlobFiles

# Fallback read size when sendfile is not available (TLS, uvloop): large pieces keep the
# per-chunk overhead small (measured: 2 MiB pieces recovered most of sendfile's speed).
FALLBACK_CHUNK = 2 * 1024 * 1024
# sendfile is handed the range in slices of this size so the bytes-sent counter moves
# while a long range is sent, and stops when the client stops reading (each slice is
# one loop.sendfile call: a few microseconds of overhead per 8 MiB).
SENDFILE_SLICE = 8 * 1024 * 1024
# What of a slice one ``loop.sendfile`` is handed once the socket is full: the stall
# clock (shared.stall) sees progress only when such a call returns, so a reader slower
# than one piece per stall period would look stalled (1 MiB per 30 s: 35 kB/s, nginx's
# floor with its defaults too). Smaller pieces cost a few microseconds each more.
WAITED_PIECE = 1024 * 1024


class RangeResponse(web.StreamResponse):
    """A response whose headers wait at ``prepare`` for the first bytes of the body.

    aiohttp sends a streamed response's headers in a ``send`` of their own at
    ``prepare``: a small segment on the wire, then the body, and the client wakes up
    for each. Against nginx, which sends a file's headers and first bytes together
    (``tcp_nopush``), the load tool spent ≈ 140 µs more CPU per 1 MiB range from us
    (docs/performance.md, the third pass). Held back, the headers leave with the
    first body write (aiohttp's own path) or, before ``sendfile``, by
    ``send_held_headers``, in one ``send`` flagged ``MSG_MORE``, so the kernel puts the
    file's first bytes in the same segment.
    """

    # aiohttp's own switch (its ``web.Response`` holds headers for its body the same way).
    _send_headers_immediately = False

    def send_held_headers(self, transport: asyncio.BaseTransport) -> None:
        """Sends the held headers now: flagged ``MSG_MORE`` on a plain socket with nothing
        buffered before them, else through aiohttp's writer as usual."""
        writer = self._payload_writer
        if writer is None:
            return  # not prepared
        raw = getattr(transport.get_extra_info("socket"), "_sock", None)
        if (
            not isinstance(writer, StreamWriter)
            or not writer._headers_buf
            or writer._headers_written
            or not isinstance(raw, socket.socket)
            or not isinstance(transport, asyncio.WriteTransport)
            or transport.get_extra_info("sslcontext") is not None
            or transport.is_closing()
            or transport.get_write_buffer_size()
        ):
            writer.send_headers()
            return
        held = writer._headers_buf
        writer._headers_buf = None
        writer._headers_written = True
        try:
            sent = raw.send(held, socket.MSG_MORE)
        except OSError:
            sent = 0  # would block, or the client left: the transport reports it
        if sent < len(held):
            transport.write(held[sent:])


async def send_range(
    request: web.Request,
    response: web.StreamResponse,
    *,
    blobs: BlobStore,
    files: OpenBlobFiles,
    key: str,
    start: int,
    length: int,
    on_bytes: Callable[[int], None],
    stall_seconds: float,
) -> None:
    """Write ``length`` bytes of ``key`` from ``start`` to the prepared ``response``.

    ``files`` holds the open files of local blobs (``blobs``'s) between requests. A client
    that takes no bytes for ``stall_seconds`` is dropped (``StreamStalledError``).
    """
    async with stall_guard(request.transport, stall_seconds) as guard:
        if not files.is_local(key) or not await _sendfile(
            request,
            response,
            files=files,
            key=key,
            start=start,
            length=length,
            on_bytes=on_bytes,
            guard=guard,
        ):
            async for piece in blobs.read(
                key, offset=start, length=length, chunk_size=FALLBACK_CHUNK
            ):
                await guard.write(response.write(piece))
                on_bytes(len(piece))
        await guard.write(response.write_eof())


async def _sendfile(
    request: web.Request,
    response: web.StreamResponse,
    *,
    files: OpenBlobFiles,
    key: str,
    start: int,
    length: int,
    on_bytes: Callable[[int], None],
    guard: StallGuard,
) -> bool:
    """The kernel copies file to socket; False where the transport cannot (then read)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client went away")
    loop = asyncio.get_running_loop()
    offset, end = start, start + length
    try:
        async with files.lease(key) as handle:
            if isinstance(response, RangeResponse):
                response.send_held_headers(transport)
            with guard.writing():
                while offset < end:
                    count = min(SENDFILE_SLICE, end - offset)
                    # The offset is explicit: the open file is shared with other requests.
                    sent = _send_at_once(transport, handle.fileno(), offset, count)
                    while sent < count:
                        if transport.is_closing():
                            raise ConnectionResetError("the client went away")
                        # asyncio flushes what the transport buffered (headers that did
                        # not leave at once) before handing over, and waits for the
                        # socket to take the rest: a slow reader pauses us here.
                        piece = min(count - sent, WAITED_PIECE)
                        try:
                            await loop.sendfile(
                                transport, handle, offset + sent, piece, fallback=False
                            )
                        except (BrokenPipeError, ConnectionAbortedError) as exc:
                            # The viewer hung up mid-range: not a server error.
                            raise ConnectionResetError("the client went away") from exc
                        except asyncio.SendfileNotAvailableError as exc:
                            if offset + sent == start:
                                raise  # nothing sent yet: reading instead is safe
                            # asyncio says this when the socket fails before a piece's
                            # first byte; bytes of this range left already, so it is the
                            # viewer that went away (and reading would send them twice).
                            raise ConnectionResetError("the client went away") from exc
                        sent += piece
                        guard.progressed()
                    guard.progressed()  # the slice is sent (at once, or piece by piece)
                    offset += count
                    on_bytes(count)
    except FileNotFoundError:
        if offset == start:
            return False  # let the store's read report it, as for any other store
        raise
    except asyncio.SendfileNotAvailableError:
        if offset == start:
            return False  # raised before a byte is sent: reading instead is safe
        raise
    return True


def _send_at_once(transport: asyncio.BaseTransport, file: int, offset: int, count: int) -> int:
    """What the socket takes of the slice right now, without waiting (0 if nothing).

    ``loop.sendfile`` costs a future, a pause of reading and an extra ``fstat`` per call,
    ≈ 5% of a 1 MiB range request; most ranges fit the socket's buffer at once. Only on a
    plain socket whose transport has nothing buffered (the headers left already), so the
    bytes cannot overtake anything; anything else is left to ``loop.sendfile``.
    """
    if transport.get_extra_info("sslcontext") is not None:
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None or not isinstance(transport, asyncio.WriteTransport):
        return 0
    if transport.is_closing() or transport.get_write_buffer_size():
        return 0
    try:
        return os.sendfile(sock.fileno(), file, offset, count)
    except OSError:
        # Would block, or the client went away: loop.sendfile waits, or reports it.
        return 0
