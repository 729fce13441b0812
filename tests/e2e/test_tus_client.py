"""A stock tus client (tuspy, from PyPI) uploads through the gateway, survives a connection
cut mid-PATCH by resuming from the server's offset, and the result becomes a video that
streams back byte for byte.

tuspy is synchronous (requests), so it runs in a thread against the gateway's real port;
the stack is the four apps in the test's loop. The cut is made by a TCP relay between
tuspy and the gateway, at a moment chosen by what the server has stored, never by a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from tusclient.client import TusClient
from tusclient.uploader.uploader import Uploader

from stream_service.tus.keys import TUS
from tests.clients import MIB
from tests.stack import Stack

pytestmark = pytest.mark.e2e

FILE_SIZE = 6 * MIB + 4321
# The first PATCH is cut after this much of its body has crossed the relay.
CUT_AFTER = 4 * MIB + MIB // 2
RELAY_PIECE = 64 * 1024


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Polls ``condition`` (state outside the test's control) for at most 10 s."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class CuttingRelay:
    """TCP in front of the gateway. The first PATCH is forwarded up to ``CUT_AFTER`` body
    bytes, then ``before_cut`` is awaited and both of its connections are aborted, as a
    dropped network would. Connections after the cut wait for ``after_cut`` first."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        before_cut: Callable[[], Awaitable[None]],
        after_cut: Callable[[], Awaitable[None]],
    ) -> None:
        self._target = (host, port)
        self._before_cut = before_cut
        self._after_cut = after_cut
        self.cut = False
        # (method, Upload-Offset or None) of every request that crossed, in order.
        self.requests: list[tuple[str, int | None]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        gateway_out: asyncio.StreamWriter | None = None
        try:
            if self.cut:
                await self._after_cut()
            head = await client_in.readuntil(b"\r\n\r\n")
            method, offset = _describe(head)
            self.requests.append((method, offset))
            gateway_in, gateway_out = await asyncio.open_connection(*self._target)
            gateway_out.write(head)
            cutting = method == "PATCH" and not self.cut
            back = asyncio.create_task(_pump(gateway_in, client_out, limit=None))
            try:
                forwarded = await _pump(
                    client_in, gateway_out, limit=CUT_AFTER if cutting else None
                )
                if cutting and forwarded >= CUT_AFTER:
                    await self._before_cut()
                    self.cut = True
                    return
                # The client is done sending: so is the relay, and the gateway closes.
                gateway_out.write_eof()
                await back
            finally:
                back.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await back
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            # abort(), not close(): a cut drops the connection without a goodbye.
            for writer in (client_out, gateway_out):
                if writer is not None:
                    writer.transport.abort()
            self._tasks.discard(task)


def _describe(head: bytes) -> tuple[str, int | None]:
    lines = head.decode("latin-1").split("\r\n")
    offset = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "upload-offset":
            offset = int(value)
    return lines[0].split(" ", 1)[0], offset


async def _pump(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, limit: int | None
) -> int:
    """Copies until EOF, or until ``limit`` bytes; returns how many were copied."""
    copied = 0
    while limit is None or copied < limit:
        size = RELAY_PIECE if limit is None else min(RELAY_PIECE, limit - copied)
        piece = await source.read(size)
        if not piece:
            break
        sink.write(piece)
        await sink.drain()
        copied += len(piece)
    return copied


def upload_url(uploader: Uploader) -> str:
    """Where tuspy was told the upload lives (its annotations say None, its value a str)."""
    url: object = uploader.url
    assert isinstance(url, str)
    return url


def tus_uploader(url: str, auth: dict[str, str], data: bytes, **options: Any) -> Uploader:
    client = TusClient(url, headers=auth)
    return client.uploader(
        file_stream=io.BytesIO(data),
        metadata={"filename": "film.mp4", "filetype": "video/mp4"},
        retry_delay=0,
        **options,
    )


async def publish_and_stream(stack: Stack, auth: dict[str, str], upload_id: str) -> bytes:
    """Makes a video of the upload, as any client would next, and streams it back."""
    response = await stack.gateway.post(
        "/api/v1/videos", json={"title": "From tus", "upload_id": upload_id}, headers=auth
    )
    assert response.status == 201, await response.text()
    video = await response.json()
    streamed = await stack.gateway.get(video["stream_url"])
    assert streamed.status == 200
    return await streamed.read()


async def test_tuspy_resumes_after_the_connection_breaks_mid_patch(stack: Stack) -> None:
    auth = await stack.new_user()
    data = os.urandom(FILE_SIZE)
    gateway = stack.servers["gateway"]
    service = stack.servers["stream"].app[TUS]
    blob_root = Path(urlsplit(stack.settings.blob_url).path)

    def stored_bytes() -> int:
        uploads = blob_root / "uploads"
        if not uploads.exists():
            return 0
        return sum(file.stat().st_size for file in uploads.rglob("*") if file.is_file())

    async def before_cut() -> None:
        # Part of the body is in storage (the local store writes 4 MiB at a time).
        await wait_until(lambda: stored_bytes() >= MIB, "the first bytes to reach storage")

    async def after_cut() -> None:
        # The cut PATCH has been stored and recorded before tuspy asks where to resume.
        await wait_until(lambda: service.in_flight == 0, "the cut PATCH to be stored")

    assert gateway.port is not None
    relay = CuttingRelay(gateway.host, gateway.port, before_cut=before_cut, after_cut=after_cut)
    port = await relay.start()
    try:
        uploader = tus_uploader(f"http://127.0.0.1:{port}/api/v1/tus/", auth, data, retries=2)
        await asyncio.to_thread(uploader.upload)
    finally:
        await relay.close()

    assert relay.cut
    methods = [method for method, _ in relay.requests]
    assert methods == ["POST", "PATCH", "HEAD", "PATCH"], relay.requests
    resumed_at = relay.requests[3][1]
    assert resumed_at is not None
    assert MIB <= resumed_at <= CUT_AFTER  # what arrived before the cut was kept
    assert relay.requests[1][1] == 0

    assert upload_url(uploader).startswith(f"http://127.0.0.1:{port}/api/v1/tus/")
    upload_id = upload_url(uploader).rsplit("/", 1)[1]
    assert await publish_and_stream(stack, auth, upload_id) == data


async def test_tuspy_in_checksummed_chunks(stack: Stack) -> None:
    auth = await stack.new_user()
    data = os.urandom(3 * MIB + 99)
    gateway = stack.servers["gateway"]
    url = f"http://{gateway.host}:{gateway.port}/api/v1/tus/"
    uploader = tus_uploader(url, auth, data, chunk_size=MIB, upload_checksum=True)
    await asyncio.to_thread(uploader.upload)
    assert uploader.offset == len(data)
    assert await publish_and_stream(stack, auth, upload_url(uploader).rsplit("/", 1)[1]) == data
