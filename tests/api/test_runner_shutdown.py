"""``shared.runner.serve_all`` on SIGTERM, in this process: which connections it closes.

The shutdown closes keep-alive connections that wait for their next request and keeps
reading every other one: a request on its way finishes, its body included. Each test
drives the real ``serve_all`` with a real signal (the loop's handler catches it) and a
raw socket, so the bytes on the wire are the test's to choose; every wait is on an event
or on the socket, bounded against a hang.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import pytest
from aiohttp import web

from shared.runner import Served, serve_all
from shared.settings import Settings
from shared.web import create_base_app
from tests.e2e.processes import free_port

PIECE = 64 * 1024
HANG = 10.0  # a bound on a hang, far beyond what any step here needs


class Server:
    """``serve_all`` running ``app`` in a task of this loop, on a free port."""

    def __init__(self, app: web.Application, settings: Settings) -> None:
        self.port = free_port()
        self.shutting_down = asyncio.Event()
        app.on_shutdown.append(self._shutdown)
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(
            serve_all([Served("app", app, self.port)], settings, on_ready=self._ready.set)
        )

    async def _shutdown(self, _: web.Application) -> None:
        # on_shutdown runs once the door is closed and idle connections with it.
        self.shutting_down.set()

    async def started(self) -> None:
        async with asyncio.timeout(HANG):
            await self._ready.wait()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def terminate(self) -> None:
        """SIGTERM, as Kubernetes sends it; returns once the door is closed."""
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(HANG):
            await self.shutting_down.wait()

    async def stopped(self) -> None:
        async with asyncio.timeout(HANG):
            await self._task


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    # A grace far longer than HANG: a connection left for the grace to end fails the test.
    return make_settings(VOD_SHUTDOWN_TIMEOUT="30")


def put_head(size: int, *, expect: bool = False) -> bytes:
    return (
        f"PUT /upload HTTP/1.1\r\nHost: vod\r\nContent-Length: {size}\r\n"
        + ("Expect: 100-continue\r\n" if expect else "")
        + "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


async def response_of(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    async with asyncio.timeout(HANG):
        return await reader.read()


async def test_a_body_still_arriving_at_sigterm_is_read_to_the_end(settings: Settings) -> None:
    # The request is off its connection but not yet counted by the middleware: aiohttp
    # runs a route's expect handler (``Expect: 100-continue``) before any middleware,
    # as it runs a handler's first step a turn after taking its request. Under load
    # SIGTERM lands in such a gap; a chunk PUT whose connection was then closed waited
    # out the body timeout, and the gateway was killed.
    app = create_base_app("test", settings, require_internal_token=False)
    expecting = asyncio.Event()
    go_on = asyncio.Event()

    async def expect_later(request: web.Request) -> None:
        expecting.set()
        await go_on.wait()
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def upload(request: web.Request) -> web.Response:
        received = 0
        async for piece in request.content.iter_any():
            received += len(piece)
        return web.Response(text=f"got {received}")

    app.router.add_put("/upload", upload, expect_handler=expect_later)
    server = Server(app, settings)
    await server.started()
    reader, writer = await server.connect()
    writer.write(put_head(2 * PIECE, expect=True))
    async with asyncio.timeout(HANG):
        await expecting.wait()
    await server.terminate()
    go_on.set()
    async with asyncio.timeout(HANG):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    # The body is sent after the door closed: the connection is still read.
    writer.write(b"a" * (2 * PIECE))
    answer = await response_of(reader)
    writer.close()
    await server.stopped()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.endswith(f"got {2 * PIECE}".encode()), answer


async def test_an_idle_keep_alive_connection_is_closed_at_once(settings: Settings) -> None:
    # A request in flight holds the shutdown; meanwhile an idle keep-alive connection is
    # closed, socket and all, so its client reconnects elsewhere instead of sending a
    # request that would be ignored.
    app = create_base_app("test", settings, require_internal_token=False)
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold(_: web.Request) -> web.Response:
        held.set()
        await release.wait()
        return web.Response(text="released")

    app.router.add_get("/hold", hold)
    server = Server(app, settings)
    await server.started()
    idle_reader, idle_writer = await server.connect()
    idle_writer.write(b"GET /healthz HTTP/1.1\r\nHost: vod\r\n\r\n")
    async with asyncio.timeout(HANG):
        await idle_reader.readuntil(b'{"status":"ok"}')
    busy_reader, busy_writer = await server.connect()
    busy_writer.write(b"GET /hold HTTP/1.1\r\nHost: vod\r\n\r\n")
    async with asyncio.timeout(HANG):
        await held.wait()
    await server.terminate()
    # While /hold is still in flight, the idle connection is already closed.
    assert await response_of(idle_reader) == b""
    release.set()
    answer = await response_of(busy_reader)
    for writer in (idle_writer, busy_writer):
        writer.close()
    await server.stopped()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.endswith(b"released"), answer
