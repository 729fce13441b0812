"""The gateway against fake upstreams: routing, header policy, streaming, failures, WebSockets."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDictProxy

from gateway.proxy.client import upstream_error
from shared.auth import TokenSigner
from shared.web import json_response
from tests.api.conftest import FakeUpstream, GatewayFactory, OperatorsFactory, Upstreams
from tests.conftest import JWT_PRIVATE_KEY
from tests.problems import problem


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A URL whose port is bound but not listening: connections are refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# --- routing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path_qs", "service"),
    [
        ("POST", "/api/v1/users", "api"),
        ("GET", "/api/v1/users/me", "api"),
        ("GET", "/api/v1/users/alice/videos?limit=5", "api"),
        ("POST", "/api/v1/sessions", "api"),
        ("POST", "/api/v1/sessions/refresh", "api"),
        ("DELETE", "/api/v1/sessions", "api"),
        ("GET", "/api/v1/videos?q=cats&limit=2&cursor=abc%3D%3D", "api"),
        ("POST", "/api/v1/videos", "api"),
        ("GET", "/api/v1/videos/v1", "api"),
        ("PATCH", "/api/v1/videos/v1", "api"),
        ("DELETE", "/api/v1/videos/v1", "api"),
        ("GET", "/api/v1/videos/v1/comments?limit=3", "api"),
        ("DELETE", "/api/v1/videos/v1/comments/c9", "api"),
        ("POST", "/api/v1/videos/v1/danmaku", "api"),
        ("GET", "/api/v1/videos/v1/danmaku?from_ms=0&to_ms=5000", "api"),
        ("GET", "/api/v1/videos/v1/live", "api"),
        ("GET", "/api/v1/videos/v1/stream", "stream"),
        ("HEAD", "/api/v1/videos/v1/stream", "stream"),
        ("GET", "/api/v1/videos/v1/thumbnail", "stream"),
        ("POST", "/api/v1/uploads", "stream"),
        ("PUT", "/api/v1/uploads/u1/chunks/3", "stream"),
        ("POST", "/api/v1/uploads/u1/complete", "stream"),
        ("POST", "/api/v1/tus/", "stream"),
        ("PATCH", "/api/v1/tus/abc", "stream"),
        ("GET", "/api/v1/admin/jobs?state=parked", "scheduler"),
        ("GET", "/api/v1/videos/a%2Fb%20c", "api"),
    ],
)
async def test_each_family_reaches_its_upstream(
    gateway: GatewayFactory, upstreams: Upstreams, method: str, path_qs: str, service: str
) -> None:
    client = await gateway()
    response = await client.request(method, path_qs)
    assert response.status == 200
    fakes = {"api": upstreams.api, "stream": upstreams.stream, "scheduler": upstreams.scheduler}
    if method != "HEAD":
        assert (await response.json())["upstream"] == service
    [seen] = fakes[service].seen
    assert (seen.method, seen.path_qs) == (method, path_qs)
    assert not any(fake.seen for name, fake in fakes.items() if name != service)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/nope",
        "/api/v1/usersx",
        "/api/v1/videos/v1/unknown",
        "/api/v1/videos/v1/stream/extra",
        "/api/v1/videos/",
        "/api/v1",
        "/api/v2/videos",
    ],
)
async def test_unknown_path_is_a_problem_from_the_gateway(
    gateway: GatewayFactory, upstreams: Upstreams, path: str
) -> None:
    client = await gateway()
    body = await problem(await client.get(path), 404, "route_not_found")
    assert body["request_id"]
    assert upstreams.api.seen == upstreams.stream.seen == upstreams.scheduler.seen == []


async def test_redirects_pass_to_the_client_unfollowed(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    async def moved(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/api/v1/videos/elsewhere")

    upstreams.api.app.router.add_get("/api/v1/videos/old", moved)
    client = await gateway()
    response = await client.get("/api/v1/videos/old", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "/api/v1/videos/elsewhere"
    assert upstreams.api.seen == []


# --- headers ---------------------------------------------------------------------------


async def test_identity_and_trust_headers_are_set_only_by_the_gateway(
    gateway: GatewayFactory, upstreams: Upstreams, internal_headers: dict[str, str]
) -> None:
    client = await gateway()
    token, identity = TokenSigner(JWT_PRIVATE_KEY).issue(
        user_id="01REALUSER", username="carol", family_id="01FAMILY"
    )
    response = await client.get(
        "/api/v1/users/me",
        headers={
            "X-User-Id": "1",
            "X-Username": "admin",
            "X-Internal-Token": "guessed-token-value",
            "X-Vod-Role": "admin",
            "X-VOD-Anything": "x",
            "X-Forwarded-For": "10.9.9.9",
            "Forwarded": "for=10.9.9.9",
            "X-Token-Id": "forged",
            "X-Token-Family": "forged",
            "X-Token-Expires": "9999999999",
            "Authorization": f"Bearer {token}",
            "X-Custom": "kept",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped",
        },
    )
    assert response.status == 200
    [seen] = upstreams.api.seen
    headers = seen.headers
    for name in ("X-Vod-Role", "X-VOD-Anything", "Forwarded", "X-Hop"):
        assert name not in headers
    # Exactly one value per identity header, and it is the verified token's.
    for name, value in identity.to_headers().items():
        assert headers.getall(name) == [value]
    assert headers.getall("X-Internal-Token") == [internal_headers["X-Internal-Token"]]
    assert headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["Authorization"] == f"Bearer {token}"
    assert headers["X-Custom"] == "kept"
    assert headers["Host"] == upstreams.api.url.removeprefix("http://")


@pytest.mark.parametrize("size", [10, 200_000], ids=["whole", "streamed"])
async def test_cookies_cross_the_gateway_on_the_sessions_routes_only(
    gateway: GatewayFactory, upstreams: Upstreams, size: int
) -> None:
    seen_cookies: dict[str, list[str]] = {}

    async def sets_a_cookie(request: web.Request) -> web.Response:
        seen_cookies[request.path] = request.headers.getall("Cookie", [])
        response = web.Response(body=b"x" * size, content_type="application/octet-stream")
        response.set_cookie("vod_refresh", "from-" + request.path, httponly=True)
        return response

    upstreams.api.app.router.add_post("/api/v1/sessions/refresh", sets_a_cookie)
    upstreams.api.app.router.add_post("/api/v1/sessions", sets_a_cookie)
    upstreams.api.app.router.add_get("/api/v1/videos/{id}", sets_a_cookie)
    upstreams.stream.app.router.add_get("/api/v1/uploads/{id}", sets_a_cookie)
    client = await gateway(client_kwargs={"cookie_jar": aiohttp.DummyCookieJar()})
    cookie = {"Cookie": "vod_refresh=secret; vod_device=device"}
    for method, path in (("POST", "/api/v1/sessions/refresh"), ("POST", "/api/v1/sessions")):
        response = await client.request(method, path, headers=cookie)
        assert response.status == 200
        assert len(await response.read()) == size
        assert response.cookies["vod_refresh"].value == "from-" + path
        assert seen_cookies[path] == [cookie["Cookie"]]
    # Any other route: the session cookies never reach it, and it cannot set a cookie.
    for path in ("/api/v1/videos/v1", "/api/v1/uploads/u1"):
        response = await client.get(path, headers=cookie)
        assert response.status == 200
        assert len(await response.read()) == size
        assert "Set-Cookie" not in response.headers
        assert seen_cookies[path] == []


async def test_upstream_sees_only_the_encodings_the_client_offered(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    client = await gateway()
    await client.get("/api/v1/videos", skip_auto_headers=["Accept-Encoding", "User-Agent"])
    await client.get("/api/v1/videos", headers={"Accept-Encoding": "br", "User-Agent": "vlc/3"})
    first, second = upstreams.api.seen
    assert "Accept-Encoding" not in first.headers
    assert "User-Agent" not in first.headers
    assert second.headers["Accept-Encoding"] == "br"
    assert second.headers["User-Agent"] == "vlc/3"


async def test_compressed_bodies_pass_through_as_they_are(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    payload = gzip.compress(b'{"hello": "world"}' * 100)

    async def gzipped(_request: web.Request) -> web.Response:
        return web.Response(
            body=payload,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    upstreams.api.app.router.add_get("/api/v1/videos/gz", gzipped)
    client = await gateway(client_kwargs={"auto_decompress": False})
    response = await client.get("/api/v1/videos/gz", headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Content-Length"] == str(len(payload))
    assert await response.read() == payload


async def test_request_id_is_kept_when_valid_and_made_otherwise(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    client = await gateway()
    given = await client.get("/api/v1/videos", headers={"X-Request-ID": "trace-42.a:b"})
    assert given.headers["X-Request-ID"] == "trace-42.a:b"
    made = await client.get("/api/v1/videos", headers={"X-Request-ID": "not valid; <script>"})
    minted = made.headers["X-Request-ID"]
    assert minted != "not valid; <script>"
    assert len(minted) == 32
    int(minted, 16)
    absent = await client.get("/api/v1/videos")
    assert len(absent.headers["X-Request-ID"]) == 32
    assert [s.headers.getall("X-Request-ID") for s in upstreams.api.seen] == [
        ["trace-42.a:b"],
        [minted],
        [absent.headers["X-Request-ID"]],
    ]


# --- bodies and ranges -----------------------------------------------------------------


@pytest.fixture
def video_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(1024 * 1024 + 17)
    path = tmp_path / "video.mp4"
    path.write_bytes(data)
    return path, data


async def test_ranges_pass_through_exactly(
    gateway: GatewayFactory, upstreams: Upstreams, video_file: tuple[Path, bytes]
) -> None:
    path, data = video_file
    seen_ranges: list[tuple[str | None, str | None]] = []

    async def serve_file(request: web.Request) -> web.FileResponse:
        seen_ranges.append((request.headers.get("Range"), request.headers.get("If-Range")))
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000"})

    upstreams.stream.app.router.add_get("/api/v1/videos/{id}/stream", serve_file)
    client = await gateway()
    url = "/api/v1/videos/v1/stream"

    whole = await client.get(url)
    assert whole.status == 200
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["Content-Length"] == str(len(data))
    assert await whole.read() == data
    etag = whole.headers["ETag"]

    part = await client.get(url, headers={"Range": "bytes=100-1123", "If-Range": etag})
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes 100-1123/{len(data)}"
    assert part.headers["Content-Length"] == "1024"
    assert part.headers["ETag"] == etag
    assert part.headers["Cache-Control"] == "public, max-age=31536000"
    assert "Transfer-Encoding" not in part.headers
    assert await part.read() == data[100:1124]

    tail = await client.get(url, headers={"Range": "bytes=-17"})
    assert tail.status == 206
    assert await tail.read() == data[-17:]

    beyond = await client.get(url, headers={"Range": f"bytes={len(data) + 5}-"})
    assert beyond.status == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(data)}"

    head = await client.head(url)
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert await head.read() == b""

    assert seen_ranges[:2] == [(None, None), ("bytes=100-1123", etag)]


async def _generated(total: int, piece: int = 64 * 1024) -> AsyncIterator[bytes]:
    block = os.urandom(piece)
    sent = 0
    while sent < total:
        chunk = block[: min(piece, total - sent)]
        sent += len(chunk)
        yield chunk


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
async def test_request_bodies_stream_to_the_upstream(
    gateway: GatewayFactory, upstreams: Upstreams, with_length: bool
) -> None:
    size = 8 * 1024 * 1024 + 5
    received: dict[str, Any] = {}

    async def take_chunk(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        count = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            count += len(chunk)
        received.update(
            count=count,
            sha=digest.hexdigest(),
            length=request.headers.get("Content-Length"),
            te=request.headers.get("Transfer-Encoding"),
            sum=request.headers.get("X-Chunk-SHA256"),
        )
        return web.Response(status=204)

    upstreams.stream.app.router.add_put("/api/v1/uploads/{id}/chunks/{index}", take_chunk)
    client = await gateway()
    expected = hashlib.sha256()
    pieces = [chunk async for chunk in _generated(size)]
    for chunk in pieces:
        expected.update(chunk)

    async def body() -> AsyncIterator[bytes]:
        for chunk in pieces:
            yield chunk

    headers = {"X-Chunk-SHA256": expected.hexdigest()}
    if with_length:
        headers["Content-Length"] = str(size)
    response = await client.put("/api/v1/uploads/u1/chunks/0", data=body(), headers=headers)
    assert response.status == 204
    assert received["count"] == size
    assert received["sha"] == expected.hexdigest()
    assert received["sum"] == expected.hexdigest()
    if with_length:
        assert (received["length"], received["te"]) == (str(size), None)
    else:
        assert (received["length"], received["te"]) == (None, "chunked")


async def test_upstream_refusing_a_body_early_answers_at_once(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    async def refuse(_request: web.Request) -> web.Response:
        return web.json_response({"code": "payload_too_large"}, status=413)

    upstreams.stream.app.router.add_put("/api/v1/uploads/{id}/chunks/{index}", refuse)
    client = await gateway()
    size = 32 * 1024 * 1024
    response = await client.put(
        "/api/v1/uploads/u1/chunks/0",
        data=_generated(size),
        headers={"Content-Length": str(size)},
    )
    assert response.status == 413
    assert (await response.json())["code"] == "payload_too_large"


# --- failures --------------------------------------------------------------------------


async def test_upstream_refusing_connections_is_a_502(
    gateway: GatewayFactory, refusing_url: str
) -> None:
    client = await gateway(VOD_STREAM_URL=refusing_url)
    body = await problem(await client.get("/api/v1/videos/v1/stream"), 502, "upstream_unavailable")
    assert refusing_url not in body["detail"]  # where the upstreams live is not public


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (aiohttp.ConnectionTimeoutError(), 504, "upstream_timeout"),
        (aiohttp.SocketTimeoutError(), 504, "upstream_timeout"),
        (aiohttp.ServerDisconnectedError(), 502, "upstream_unavailable"),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), 502, "upstream_unavailable"),
        (None, 502, "upstream_unavailable"),
    ],
)
def test_upstream_failures_map_to_gateway_problems(
    error: BaseException | None, status: int, code: str
) -> None:
    problem = upstream_error("stream", error)
    assert (problem.status, problem.instance_code) == (status, code)


async def test_upstream_that_never_answers_is_a_504(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    reached = asyncio.Event()

    async def hold(_request: web.Request) -> web.Response:
        reached.set()
        await upstreams.release.wait()
        return web.Response(text="too late")

    upstreams.api.app.router.add_get("/api/v1/videos", hold)
    client = await gateway(VOD_UPSTREAM_READ_TIMEOUT="0.2")
    await problem(await client.get("/api/v1/videos"), 504, "upstream_timeout")
    assert reached.is_set()


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
async def test_upstream_dying_mid_body_cuts_the_client_off(
    gateway: GatewayFactory, upstreams: Upstreams, with_length: bool
) -> None:
    async def die_midway(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if with_length:
            response.content_length = 1024 * 1024
        await response.prepare(request)
        await response.write(b"x" * 64 * 1024)
        assert request.transport is not None
        request.transport.abort()
        return response

    upstreams.stream.app.router.add_get("/api/v1/videos/{id}/stream", die_midway)
    client = await gateway()
    response = await client.get("/api/v1/videos/v1/stream")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_a_slow_upstream_is_not_a_stalled_client(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    """The relay's stall clock counts only waiting on the client: an upstream pausing
    longer than the stall period between two pieces does not get the client dropped."""
    stall = 0.3

    async def pause_midway(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 2 * 128 * 1024
        await response.prepare(request)
        await response.write(b"a" * 128 * 1024)
        await asyncio.sleep(stall * 4)  # the upstream's own pace: what the test is about
        await response.write(b"b" * 128 * 1024)
        return response

    upstreams.stream.app.router.add_get("/api/v1/videos/{id}/stream", pause_midway)
    client = await gateway(VOD_STREAM_STALL_SECONDS=str(stall))
    response = await client.get("/api/v1/videos/v1/stream")
    assert response.status == 200
    assert await response.read() == b"a" * 128 * 1024 + b"b" * 128 * 1024


async def test_small_answer_dying_mid_body_is_a_502(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    # A small answer is read whole before anything is relayed: when it breaks off, no
    # byte has reached the client yet, so it gets a problem document, not a torn body.
    async def die_midway(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.abort()
        return response

    upstreams.api.app.router.add_get("/api/v1/videos/{id}", die_midway)
    client = await gateway()
    await problem(await client.get("/api/v1/videos/v1"), 502, "upstream_unavailable")


async def test_client_hanging_up_cancels_the_upstream_request(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    reached = asyncio.Event()
    cancelled = asyncio.Event()

    async def hold(_request: web.Request) -> web.Response:
        reached.set()
        try:
            await upstreams.release.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="too late")

    upstreams.api.app.router.add_get("/api/v1/videos", hold)
    client = await gateway()
    request = asyncio.create_task(client.get("/api/v1/videos"))
    await reached.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    async with asyncio.timeout(5):  # a bound on a hang, not a wait for time to pass
        await cancelled.wait()


async def test_client_hanging_up_mid_download_closes_the_upstream_stream(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream_stopped = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"v" * 65536)
        except (ConnectionResetError, asyncio.CancelledError):
            upstream_stopped.set()
            raise

    upstreams.stream.app.router.add_get("/api/v1/videos/{id}/stream", endless)
    client = await gateway()
    response = await client.get("/api/v1/videos/v1/stream")
    assert len(await response.content.readexactly(1024 * 1024)) == 1024 * 1024
    response.close()
    async with asyncio.timeout(5):
        await upstream_stopped.wait()


async def test_round_robin_spreads_over_replicas(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    other = await upstreams.start(FakeUpstream("api-2"))
    await upstreams.start(upstreams.api)
    client = await gateway(VOD_API_URL=f"{upstreams.api.url},{other.url}")
    answers = [(await (await client.get("/api/v1/videos")).json())["upstream"] for _ in range(4)]
    assert sorted(answers) == ["api", "api", "api-2", "api-2"]
    assert answers[0] != answers[1]


async def test_a_refusing_replica_is_skipped(
    gateway: GatewayFactory, upstreams: Upstreams, refusing_url: str
) -> None:
    await upstreams.start(upstreams.api)
    client = await gateway(VOD_API_URL=f"{refusing_url},{upstreams.api.url}")
    for _ in range(2):  # whichever replica the rotation starts from
        response = await client.post("/api/v1/users", json={"username": "ann"})
        assert (await response.json())["upstream"] == "api"
    assert [seen.body for seen in upstreams.api.seen] == [b'{"username": "ann"}'] * 2


# --- WebSockets ------------------------------------------------------------------------


@dataclass
class LiveUpstream:
    handshake_headers: list[CIMultiDictProxy[str]] = field(default_factory=list)
    handshake_query: list[str] = field(default_factory=list)
    client_close: asyncio.Future[int | None] | None = None

    async def live(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["id"] == "missing":
            return json_response({"code": "video_not_found"}, status=404)
        self.handshake_headers.append(request.headers)
        self.handshake_query.append(request.query_string)
        ws = web.WebSocketResponse(protocols=("vod.live.v1",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT and message.data.startswith("close "):
                code = int(message.data.removeprefix("close "))
                await ws.close(code=code, message=b"no such video")
            elif message.type is WSMsgType.TEXT:
                await ws.send_str("echo " + message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        if self.client_close is not None and not self.client_close.done():
            self.client_close.set_result(ws.close_code)
        return ws


@pytest.fixture
async def live(upstreams: Upstreams) -> LiveUpstream:
    fake = LiveUpstream(client_close=asyncio.get_running_loop().create_future())
    upstreams.api.app.router.add_get("/api/v1/videos/{id}/live", fake.live)
    return fake


async def test_websocket_messages_pass_both_ways(
    gateway: GatewayFactory, live: LiveUpstream, internal_headers: dict[str, str]
) -> None:
    client = await gateway()
    token, identity = TokenSigner(JWT_PRIVATE_KEY).issue(
        user_id="01VIEWER", username="viewer", family_id="01FAMILY"
    )
    async with client.ws_connect(
        f"/api/v1/videos/v1/live?access_token={token}&since=5",
        headers={"X-User-Id": "1", "X-Request-ID": "ws-1"},
        protocols=("vod.live.v1",),
    ) as ws:
        assert ws.protocol == "vod.live.v1"
        await ws.send_str("hello")
        assert await ws.receive_str() == "echo hello"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes() == b"\x02\x01\x00"
    [headers] = live.handshake_headers
    assert headers["X-Internal-Token"] == internal_headers["X-Internal-Token"]
    assert headers["X-Request-ID"] == "ws-1"
    # Browsers send the token in the query; the upstream gets the identity, never the token.
    assert headers.getall("X-User-Id") == [identity.user_id]
    assert live.handshake_query == ["since=5"]


async def test_upstream_close_code_reaches_the_client(
    gateway: GatewayFactory, live: LiveUpstream
) -> None:
    client = await gateway()
    async with client.ws_connect("/api/v1/videos/v1/live") as ws:
        await ws.send_str("close 4404")
        message = await ws.receive()
        assert message.type is WSMsgType.CLOSE
        assert message.data == 4404
        assert message.extra == "no such video"
    assert ws.close_code == 4404


async def test_client_close_code_reaches_the_upstream(
    gateway: GatewayFactory, live: LiveUpstream
) -> None:
    client = await gateway()
    async with client.ws_connect("/api/v1/videos/v1/live") as ws:
        await ws.send_str("ping")
        assert await ws.receive_str() == "echo ping"
        await ws.close(code=4000)
    assert live.client_close is not None
    async with asyncio.timeout(5):
        assert await live.client_close == 4000


async def test_shutdown_closes_websockets_as_going_away(
    gateway: GatewayFactory, live: LiveUpstream
) -> None:
    client = await gateway()
    ws = await client.ws_connect("/api/v1/videos/v1/live")
    await ws.send_str("ping")
    assert await ws.receive_str() == "echo ping"
    shutdown = asyncio.create_task(client.server.close())
    message = await ws.receive()
    assert message.type is WSMsgType.CLOSE
    assert message.data == 1001
    await shutdown
    await ws.close()
    assert live.client_close is not None
    async with asyncio.timeout(5):
        assert await live.client_close == 1001


async def test_client_vanishing_closes_the_upstream_as_going_away(
    gateway: GatewayFactory, live: LiveUpstream
) -> None:
    client = await gateway()
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        b"GET /api/v1/videos/v1/live HTTP/1.1\r\nHost: gateway\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    writer.transport.abort()  # gone without a close frame, as a dropped network would
    writer.close()
    assert live.client_close is not None
    async with asyncio.timeout(5):
        assert await live.client_close == 1001


async def test_upgrade_without_a_valid_handshake_is_a_400(
    gateway: GatewayFactory, live: LiveUpstream
) -> None:
    client = await gateway()
    response = await client.get(
        "/api/v1/videos/v1/live", headers={"Upgrade": "websocket", "Connection": "Upgrade"}
    )
    await problem(response, 400, "websocket_handshake_invalid")
    assert live.handshake_headers == []


async def test_refused_upgrade_is_a_problem_with_the_upstream_status(
    gateway: GatewayFactory, live: LiveUpstream
) -> None:
    client = await gateway()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/api/v1/videos/missing/live")
    assert refused.value.status == 404
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    response = await client.get("/api/v1/videos/missing/live", headers=handshake)
    await problem(response, 404, "websocket_refused")
    assert live.handshake_headers == []


async def test_websocket_to_an_unreachable_upstream_is_a_502(
    gateway: GatewayFactory, refusing_url: str
) -> None:
    client = await gateway(VOD_API_URL=refusing_url)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/api/v1/videos/v1/live")
    assert refused.value.status == 502


# --- the gateway's own endpoints -------------------------------------------------------


async def test_openapi_document_is_served(gateway: GatewayFactory) -> None:
    client = await gateway()
    response = await client.get("/api/v1/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    document = await response.json()
    assert document["openapi"].startswith("3.")
    assert "/api/v1/videos/{id}/stream" in document["paths"]
    assert "Problem" in document["components"]["schemas"]


async def test_ready_when_every_service_has_a_healthy_replica(
    gateway: GatewayFactory, operators: OperatorsFactory
) -> None:
    client = await gateway()
    public = await client.get("/readyz")
    assert public.status == 200
    assert await public.json() == {"status": "ready"}
    response = await (await operators(client)).get("/readyz")
    assert response.status == 200
    assert (await response.json())["checks"] == {
        "redis": "ok",  # the revocation list
        "upstream_api": "ok",
        "upstream_stream": "ok",
        "upstream_scheduler": "ok",
    }


async def test_not_ready_when_a_service_has_no_healthy_replica(
    gateway: GatewayFactory, operators: OperatorsFactory, refusing_url: str
) -> None:
    client = await gateway(VOD_SCHEDULER_URL=refusing_url)
    response = await (await operators(client)).get("/readyz")
    assert response.status == 503
    checks = (await response.json())["checks"]
    assert checks["upstream_api"] == "ok"
    assert checks["upstream_scheduler"] == "error: NoHealthyReplicaError"


async def test_public_readyz_says_only_not_ready(
    gateway: GatewayFactory, refusing_url: str
) -> None:
    # Which upstream is down, and how it failed, is for operators only.
    client = await gateway(VOD_SCHEDULER_URL=refusing_url)
    response = await client.get("/readyz")
    assert response.status == 503
    assert await response.json() == {"status": "not ready"}


async def test_public_port_serves_no_metrics_the_operators_listener_does(
    gateway: GatewayFactory, operators: OperatorsFactory
) -> None:
    client = await gateway()
    assert (await client.get("/api/v1/videos")).status == 200
    await problem(await client.get("/metrics"), 404, "route_not_found")
    response = await (await operators(client)).get("/metrics")
    assert response.status == 200
    text = await response.text()
    # The public app's own series: the operators' listener shares its registry.
    assert 'route="/api/v1/videos",service="gateway",status="200"' in text
    assert "vod_gateway_upstream_replica_up" in text


async def test_gateway_needs_no_internal_token(gateway: GatewayFactory) -> None:
    client = await gateway()
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/api/v1/videos")).status == 200
