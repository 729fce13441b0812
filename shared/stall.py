"""Dropping a response whose client has stopped reading.

A write to a socket whose buffers are full waits until the client reads; one that never
reads would hold what serves it for ever: a stream slot and an open file at the stream
service, an upstream connection at the gateway (docs/security.md: eight such sockets held
their slots for over 75 s). So a streamed body is written under ``stall_guard``: once a
write has been waiting ``seconds`` (``VOD_STREAM_STALL_SECONDS``) without the socket
taking a byte, the sending task is cancelled and the connection reset. Only waiting on the
client counts; time spent reading the blob store or the upstream between writes does not.

The clock is one timer per response, moved only when it fires (at most once per period),
so progress costs a ``loop.time()`` call and nothing more.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import TypeVar

T = TypeVar("T")

# SO_LINGER on, timeout 0: close() resets the connection instead of keeping the unsent
# bytes queued (in kernel memory) for a client that reads nothing.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class StreamStalledError(ConnectionResetError):
    """The client took no bytes for the stall period; its connection was reset.

    A ``ConnectionResetError``, so it ends a handler as a client hanging up does.
    """


class StallGuard:
    """The write progress of one response (use ``stall_guard``)."""

    __slots__ = ("_deadline", "_last", "_loop", "_seconds", "_timer", "_writing", "stalled")

    def __init__(self, seconds: float, deadline: asyncio.Timeout) -> None:
        self._loop = asyncio.get_running_loop()
        self._seconds = seconds
        self._deadline = deadline
        self._last = self._loop.time()
        self._writing = False
        self.stalled = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            self._last + seconds, self._check
        )

    def progressed(self) -> None:
        """The socket took bytes: the stall clock starts again."""
        self._last = self._loop.time()

    async def write(self, pending: Awaitable[T]) -> T:
        """Awaits ``pending`` (a write to the client) as a write the clock watches."""
        with self.writing():
            return await pending

    @contextmanager
    def writing(self) -> Iterator[None]:
        """The block writes to the client; call ``progressed`` as the socket takes bytes."""
        self._writing = True
        self._last = self._loop.time()
        try:
            yield
        finally:
            self._writing = False
            self._last = self._loop.time()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        now = self._loop.time()
        if self._writing and now - self._last >= self._seconds:
            self._timer = None
            self.stalled = True
            self._deadline.reschedule(now)  # cancels the sending task, right away
            return
        due = self._last + self._seconds if self._writing else now + self._seconds
        self._timer = self._loop.call_at(due, self._check)


@asynccontextmanager
async def stall_guard(
    transport: asyncio.Transport | None, seconds: float
) -> AsyncIterator[StallGuard]:
    """Runs the block's writes (``StallGuard.write``/``writing``) under the stall clock.

    Raises ``StreamStalledError``, with the connection reset, when a write waited
    ``seconds`` without progress; anything else the block raises passes through.
    """
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    guard: StallGuard | None = None
    try:
        async with asyncio.timeout(None) as deadline:
            guard = StallGuard(seconds, deadline)
            yield guard
    except TimeoutError:
        if guard is None or not guard.stalled:
            raise
        reset(transport)
        raise StreamStalledError(
            f"the client took no bytes for {seconds:g} s; connection reset"
        ) from None
    finally:
        if guard is not None:
            guard.stop()


def reset(transport: asyncio.Transport) -> None:
    """Closes ``transport`` at once with a TCP reset, dropping whatever it had not sent."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):  # not TCP, or already gone: abort() alone will do
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    transport.abort()
