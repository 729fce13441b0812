"""Streaming a published video through the gateway: RFC 9110 ranges, validators, limiter."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest

from gateway.app import create_app as create_gateway_app
from shared.web import server_options
from stream_service.keys import LIMITER
from tests.clients import MIB, Publisher
from tests.conftest import INTERNAL_TOKEN
from tests.problems import problem
from tests.stack import Stack, start_stack

# An MP4 file header (ftyp box) then noise: enough for the type sniffer.
MP4_HEAD = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41"


async def publish(stack: Stack, data: bytes) -> tuple[Publisher, dict[str, Any]]:
    name = f"streamer_{os.urandom(3).hex()}"
    publisher = Publisher(stack, name, await stack.new_user(name))
    response = await publisher.publish(upload_id=await publisher.upload(data))
    assert response.status == 201, await response.text()
    return publisher, await response.json()


@pytest.fixture
async def film(stack: Stack) -> tuple[bytes, dict[str, Any]]:
    data = MP4_HEAD + os.urandom(100_000)
    _publisher, video = await publish(stack, data)
    return data, video


async def get(stack: Stack, video: dict[str, Any], **headers: str) -> aiohttp.ClientResponse:
    return await stack.gateway.get(video["stream_url"], headers=headers)


async def test_full_get_with_validators_and_sniffed_type(
    stack: Stack, film: tuple[bytes, dict[str, Any]]
) -> None:
    data, video = film
    response = await get(stack, video)
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Content-Type"] == "video/mp4"
    assert response.headers["ETag"] == f'"{video["content_hash"]}"'
    assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert response.headers["Last-Modified"].endswith(" GMT")


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=50000-", 50000, None),
        ("bytes=-1000", -1000, None),
        ("bytes=99000-999999999", 99000, None),
    ],
)
async def test_single_ranges_are_206_with_exact_bytes(
    stack: Stack,
    film: tuple[bytes, dict[str, Any]],
    range_header: str,
    start: int,
    end: int | None,
) -> None:
    data, video = film
    expected = data[start : (end + 1 if end is not None else None)]
    response = await get(stack, video, Range=range_header)
    assert response.status == 206
    assert await response.read() == expected
    first = start if start >= 0 else len(data) + start
    assert response.headers["Content-Range"] == (
        f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
    )
    assert response.headers["Content-Length"] == str(len(expected))


async def test_a_ranges_headers_leave_with_its_first_bytes(
    stack: Stack, film: tuple[bytes, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers sent in a segment of their own cost a player (and any client) one more
    wake-up per range: they go out flagged MSG_MORE, so the kernel sends the file's first
    bytes with them. Also the guard on the aiohttp internals this relies on."""
    flagged: list[bytes] = []
    plain_send = socket.socket.send

    def send(sock: socket.socket, data: bytes, flags: int = 0) -> int:
        if flags & socket.MSG_MORE:
            flagged.append(bytes(data))
        return plain_send(sock, data, flags)

    monkeypatch.setattr(socket.socket, "send", send)
    data, video = film
    response = await get(stack, video, Range="bytes=100-199")
    assert response.status == 206
    assert await response.read() == data[100:200]
    assert [head.split(b"\r\n", 1)[0] for head in flagged] == [b"HTTP/1.1 206 Partial Content"]
    assert b"\r\nContent-Range: bytes 100-199/" in flagged[0]


async def test_unsatisfiable_range_is_416_with_the_size(
    stack: Stack, film: tuple[bytes, dict[str, Any]]
) -> None:
    data, video = film
    response = await get(stack, video, Range=f"bytes={len(data)}-")
    await problem(response, 416, "range_not_satisfiable")
    assert response.headers["Content-Range"] == f"bytes */{len(data)}"


async def test_several_ranges_get_the_whole_file(
    stack: Stack, film: tuple[bytes, dict[str, Any]]
) -> None:
    data, video = film
    response = await get(stack, video, Range="bytes=0-9,100-109")
    assert response.status == 200
    assert await response.read() == data


async def test_if_range_keeps_the_range_only_for_the_same_file(
    stack: Stack, film: tuple[bytes, dict[str, Any]]
) -> None:
    data, video = film
    etag = f'"{video["content_hash"]}"'
    same = await get(stack, video, Range="bytes=0-9", **{"If-Range": etag})
    assert same.status == 206
    other = await get(stack, video, Range="bytes=0-9", **{"If-Range": '"another"'})
    assert other.status == 200
    assert await other.read() == data
    modified = (await get(stack, video)).headers["Last-Modified"]
    by_date = await get(stack, video, Range="bytes=0-9", **{"If-Range": modified})
    assert by_date.status == 206
    old = format_datetime(datetime(2020, 1, 1, tzinfo=UTC), usegmt=True)
    assert (await get(stack, video, Range="bytes=0-9", **{"If-Range": old})).status == 200


async def test_head_and_conditional_get(stack: Stack, film: tuple[bytes, dict[str, Any]]) -> None:
    data, video = film
    head = await stack.gateway.head(video["stream_url"])
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert await head.read() == b""
    etag = head.headers["ETag"]
    assert (await get(stack, video, **{"If-None-Match": etag})).status == 304


@pytest.mark.parametrize("since", ["Mon, 01 Jan 2024 00:00:00", "Mon, 01 Jan 2024 00:00:00 -0000"])
async def test_an_if_modified_since_without_a_zone_is_ignored_not_a_500(
    stack: Stack, film: tuple[bytes, dict[str, Any]], since: str
) -> None:
    """Issue 19, point 9: anonymously, each of these was a 500 with a traceback."""
    data, video = film
    response = await get(stack, video, **{"If-Modified-Since": since})
    assert response.status == 200, await response.text()
    assert await response.read() == data
    ranged = await get(stack, video, Range="bytes=0-9", **{"If-Range": since})
    assert ranged.status == 200, await ranged.text()
    # asctime's form is an HTTP-date (in UTC): a date after the film's is a 304.
    asctime = "Sun Nov  6 08:49:37 2094"
    assert (await get(stack, video, **{"If-Modified-Since": asctime})).status == 304


async def test_deleted_or_unknown_videos_do_not_stream(
    stack: Stack, film: tuple[bytes, dict[str, Any]]
) -> None:
    _data, video = film
    await problem(
        await stack.gateway.get("/api/v1/videos/01NOSUCHVIDEO000000000000/stream"),
        404,
        "video_not_found",
    )
    assert (await get(stack, video)).status == 200  # now in the stream cache
    owner = video["author"]["username"]
    tokens = await stack.sign_in(owner)
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert (await stack.gateway.delete(f"/api/v1/videos/{video['id']}", headers=auth)).status == 202
    await problem(await get(stack, video), 404, "video_not_found")


async def test_thumbnail_is_404_until_made(
    stack: Stack, film: tuple[bytes, dict[str, Any]]
) -> None:
    _data, video = film
    response = await stack.gateway.get(f"/api/v1/videos/{video['id']}/thumbnail")
    await problem(response, 404, "thumbnail_not_found")


async def wait_until_idle(limiter: Any) -> None:
    """Bounded poll: the stream service frees a slot on its own schedule."""
    for _ in range(500):
        if limiter.active == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{limiter.active} stream(s) still hold a slot")


async def test_the_limiter_refuses_at_once_and_frees_the_slot_on_disconnect(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Any
) -> None:
    stack = await start_stack(
        make_settings(VOD_STREAM_MAX_PER_CLIENT="1"), aiohttp_server, aiohttp_client
    )
    # Larger than every socket buffer between here and the file, so a client that does
    # not read holds its stream open; and the proof that the gateway does not buffer it.
    data = MP4_HEAD + os.urandom(48 * MIB)
    _publisher, video = await publish(stack, data)
    limiter = stack.servers["stream"].app[LIMITER]

    async with aiohttp.ClientSession() as session:
        url = stack.gateway.make_url(video["stream_url"])
        held = await session.get(url)
        assert held.status == 200
        assert limiter.active == 1
        refused = await stack.gateway.get(video["stream_url"])
        await problem(refused, 429, "too_many_streams_per_client")
        assert refused.headers["Retry-After"] == "1"
        held.close()  # the viewer goes away without reading the rest
        await wait_until_idle(limiter)  # the service learns of the hang-up asynchronously
    again = await stack.gateway.get(video["stream_url"], headers={"Range": "bytes=0-1023"})
    assert again.status == 206
    assert hashlib.sha256(await again.read()).digest() == hashlib.sha256(data[:1024]).digest()
    await wait_until_idle(limiter)  # the 206's handler ends just after its last byte
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.servers["stream"].make_url("/metrics")) as response,
    ):
        metrics = await response.text()
    assert "vod_stream_refused_total 1.0" in metrics
    assert "vod_stream_active 0.0" in metrics


# -- clients that stop reading (issue 19, point 8) ------------------------------------------

STALL_SECONDS = 1.0
# How long past the stall period a drop may take to be seen (scheduling on 2 busy cores).
STALL_SLACK = 10.0


async def wait_for_slots(limiter: Any, active: int, within: float) -> float:
    """Bounded poll until ``limiter`` holds ``active`` slots; the time it took."""
    started = time.monotonic()
    while limiter.active != active:
        if time.monotonic() - started > within:
            raise AssertionError(f"{limiter.active} stream(s) hold a slot, not {active}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def request_and_never_read(
    host: str, port: int, path: str, headers: dict[str, str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A GET from a socket whose receive buffer is tiny and which then reads nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}\r\n".encode())
    await writer.drain()
    return reader, writer


async def read_until_closed(reader: asyncio.StreamReader) -> int:
    """Reads what the server left before closing; how many bytes that was."""
    received = 0
    try:
        while piece := await asyncio.wait_for(reader.read(1024 * 1024), timeout=STALL_SLACK):
            received += len(piece)
    except ConnectionResetError:
        pass
    return received


@pytest.mark.parametrize("store", ["local", "s3"])
async def test_a_stream_the_client_stops_reading_is_dropped_and_its_slot_freed(
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Any,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    """Local blobs go out with sendfile, S3 blobs as reads written to the response: a
    client that stops reading is dropped on either path."""
    env = {"VOD_STREAM_MAX_PER_CLIENT": "1", "VOD_STREAM_STALL_SECONDS": str(STALL_SECONDS)}
    if store == "s3":
        s3_server = request.getfixturevalue("s3_server")
        env["VOD_BLOB_URL"] = s3_server.url(f"stall-{os.urandom(4).hex()}")
    stack = await start_stack(make_settings(**env), aiohttp_server, aiohttp_client)
    # Far more than the stream service's socket buffer and the client's.
    data = MP4_HEAD + os.urandom(16 * MIB)
    _publisher, video = await publish(stack, data)
    stream = stack.servers["stream"]
    limiter = stream.app[LIMITER]
    assert stream.host is not None
    assert stream.port is not None
    reader, writer = await request_and_never_read(
        stream.host, stream.port, video["stream_url"], {"X-Internal-Token": INTERNAL_TOKEN}
    )
    try:
        started = time.monotonic()
        await wait_for_slots(limiter, 1, STALL_SLACK)
        # The slot is held: the same client cannot open another stream...
        refused = await stack.gateway.get(video["stream_url"])
        await problem(refused, 429, "too_many_streams_per_client")
        # ...until the stalled one is dropped, not before the stall period.
        await wait_for_slots(limiter, 0, STALL_SECONDS + STALL_SLACK)
        assert time.monotonic() - started >= STALL_SECONDS * 0.9
        # The connection was reset: the client never gets the rest.
        assert await read_until_closed(reader) < len(data)
    finally:
        writer.close()
    again = await stack.gateway.get(video["stream_url"], headers={"Range": "bytes=0-1023"})
    assert again.status == 206
    assert await again.read() == data[:1024]


async def test_the_gateway_drops_a_client_that_stops_reading_and_frees_the_upstream(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Any
) -> None:
    """The stream service's own stall period is long here: what frees its slot is the
    gateway dropping the client and closing the upstream connection the relay held."""
    stack = await start_stack(
        make_settings(VOD_STREAM_MAX_PER_CLIENT="1", VOD_STREAM_STALL_SECONDS="600"),
        aiohttp_server,
        aiohttp_client,
    )
    settings = dataclasses.replace(stack.settings, stream_stall_seconds=STALL_SECONDS)
    app = create_gateway_app(settings)
    gateway = await aiohttp_server(app, **server_options(app))
    # More than every socket buffer between the stream service and the client.
    data = MP4_HEAD + os.urandom(48 * MIB)
    _publisher, video = await publish(stack, data)
    limiter = stack.servers["stream"].app[LIMITER]
    reader, writer = await request_and_never_read(
        gateway.host, gateway.port, video["stream_url"], {}
    )
    try:
        started = time.monotonic()
        await wait_for_slots(limiter, 1, STALL_SLACK)
        await wait_for_slots(limiter, 0, STALL_SECONDS + STALL_SLACK)
        assert time.monotonic() - started >= STALL_SECONDS * 0.9
        assert await read_until_closed(reader) < len(data)
    finally:
        writer.close()
    again = await stack.gateway.get(video["stream_url"], headers={"Range": "bytes=0-1023"})
    assert again.status == 206
    assert await again.read() == data[:1024]


async def test_a_slow_reader_that_keeps_reading_is_not_dropped(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Any
) -> None:
    """Progress counts, not speed: a client taking bytes far slower than the socket could
    send them, but steadily, gets the whole film under a short stall period."""
    stall = 2.0
    rate = 1.5 * MIB  # bytes/s: a waited piece (1 MiB) takes a third of the stall period
    stack = await start_stack(
        make_settings(VOD_STREAM_STALL_SECONDS=str(stall)), aiohttp_server, aiohttp_client
    )
    data = MP4_HEAD + os.urandom(8 * MIB)
    _publisher, video = await publish(stack, data)
    stream = stack.servers["stream"]
    assert stream.host is not None
    assert stream.port is not None
    reader, writer = await request_and_never_read(
        stream.host, stream.port, video["stream_url"], {"X-Internal-Token": INTERNAL_TOKEN}
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=STALL_SLACK)
        assert head.startswith(b"HTTP/1.1 200 "), head
        digest, received = hashlib.sha256(), 0
        while received < len(data):
            piece = await asyncio.wait_for(reader.read(64 * 1024), timeout=STALL_SLACK)
            assert piece, f"dropped after {received} of {len(data)} bytes"
            digest.update(piece)
            received += len(piece)
            await asyncio.sleep(len(piece) / rate)  # the client's pace, not a wait for the server
        assert digest.digest() == hashlib.sha256(data).digest()
    finally:
        writer.close()
