"""Hostile input through the gateway: every case gets a 4xx or a close, never a 5xx or a hang.

Path traversal and NUL bytes in ids and names, oversized and deeply nested JSON, wrong
content types, huge headers, slow clients (slowloris on headers and on bodies),
oversized WebSocket frames. The full stack runs on embedded back ends; a second gateway
with short client timeouts (``hardened``) stands in front of the same upstreams, served
with the gateway's own server options, as ``shared.runner`` and ``standalone`` serve it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestServer

from gateway.app import create_app as create_gateway_app
from gateway.proxy.client import WEBSOCKET_MAX_MESSAGE_BYTES
from shared.settings import Settings
from shared.web import server_options
from tests.clients import Publisher, Uploader, sha256
from tests.stack import Stack, start_stack

# The hardened gateway's bounds: short, so the tests finish quickly.
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MIN_BODY_RATE = 1000
# How long past a bound a dropped connection may take to close (scheduling on 2 cores).
SLACK = 2.0


@dataclasses.dataclass
class Hardened:
    stack: Stack
    server: TestServer

    @property
    def host(self) -> str:
        assert self.server.host is not None
        return self.server.host

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def hardened(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> Hardened:
    stack = await start_stack(make_settings(), aiohttp_server, aiohttp_client)
    settings = dataclasses.replace(
        stack.settings,
        client_header_timeout=HEADER_TIMEOUT,
        client_body_timeout=BODY_TIMEOUT,
        client_min_body_rate=MIN_BODY_RATE,
    )
    app = create_gateway_app(settings)
    return Hardened(stack, await aiohttp_server(app, **server_options(app)))


async def is_problem(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/problem+json", text
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == status
    if code is not None:
        assert body["code"] == code, body
    return body


def assert_refused(status: int, text: str) -> None:
    assert 400 <= status < 500, f"{status}: {text[:300]}"


# -- ids and names ------------------------------------------------------------------------

HOSTILE_IDS = [
    "..",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2E%2E%2F%2E%2E%2Fvar",
    "..%5C..%5Cwindows",
    "%00",
    "abc%00def",
    "abc%00..%2F",
    "%C0%AE%C0%AE%2F",  # overlong UTF-8 for "../"
    "%FF%FE",  # not UTF-8 at all
    "a" * 4_000,
    "01" + "Z" * 24,  # the shape of an id, naming nothing
]

ID_ROUTES = [
    ("GET", "/api/v1/videos/{x}"),
    ("PATCH", "/api/v1/videos/{x}"),
    ("DELETE", "/api/v1/videos/{x}"),
    ("GET", "/api/v1/videos/{x}/stream"),
    ("GET", "/api/v1/videos/{x}/thumbnail"),
    ("GET", "/api/v1/videos/{x}/comments"),
    ("DELETE", "/api/v1/videos/{x}/comments/{x}"),
    ("GET", "/api/v1/videos/{x}/danmaku"),
    ("GET", "/api/v1/users/{x}"),
    ("GET", "/api/v1/users/{x}/videos"),
    ("GET", "/api/v1/uploads/{x}"),
    ("DELETE", "/api/v1/uploads/{x}"),
    ("PUT", "/api/v1/uploads/{x}/chunks/0"),
    ("PUT", "/api/v1/uploads/{x}/chunks/{x}"),
    ("POST", "/api/v1/uploads/{x}/complete"),
    ("GET", "/api/v1/admin/deletions/{x}"),
    ("GET", "/api/v1/admin/queues/{x}/parked"),
    ("GET", "/static/{x}"),
]


async def test_hostile_ids_are_refused_with_a_problem(stack: Stack) -> None:
    auth = await stack.new_user()
    session = stack.gateway.session
    for method, template in ID_ROUTES:
        for hostile in HOSTILE_IDS:
            # Sent as typed: yarl would otherwise re-encode or resolve the dot segments.
            url = stack.gateway.make_url("").with_path(
                template.replace("{x}", hostile), encoded=True
            )
            body = b"{}" if method in ("PATCH", "POST") else b"x" if method == "PUT" else None
            headers = {**auth, "Content-Type": "application/json"} if body else auth
            async with session.request(method, url, data=body, headers=headers) as response:
                text = await response.text()
                assert_refused(response.status, text)
                assert response.content_type == "application/problem+json", (url, text)


async def test_an_overlong_request_line_is_refused_by_the_parser(stack: Stack) -> None:
    """Past 8190 bytes aiohttp's parser answers 400 itself, before any vod code runs
    (so as plain text, not a problem document: see docs/security.md)."""
    url = stack.gateway.make_url("").with_path("/api/v1/videos/" + "a" * 10_000, encoded=True)
    async with stack.gateway.session.get(url) as response:
        assert response.status == 400


async def test_no_traversal_out_of_the_static_files(stack: Stack) -> None:
    for path in ("/static/../../pyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml"):
        url = stack.gateway.make_url("").with_path(path, encoded=True)
        async with stack.gateway.session.get(url) as response:
            text = await response.text()
            assert "[project]" not in text
            assert_refused(response.status, text)


async def test_hostile_names_in_bodies(stack: Stack) -> None:
    auth = await stack.new_user()
    for filename in ("../../etc/passwd", "a\x00b.mp4", "..\\..\\x", "/abs/path", "x" * 5000):
        response = await stack.gateway.post(
            "/api/v1/uploads",
            json={"filename": filename, "size": 10, "content_hash": "a" * 64},
            headers=auth,
        )
        # A name is metadata, never a path: either refused or kept as text.
        assert response.status in (201, 400), await response.text()
        if response.status == 400:
            await is_problem(response, 400)
    for filename in ("../../etc/passwd\x00", "..\\..\\boot.ini", "/" * 100):
        encoded = base64.b64encode(filename.encode()).decode()
        response = await stack.gateway.post(
            "/api/v1/tus/",
            headers={
                **auth,
                "Tus-Resumable": "1.0.0",
                "Upload-Length": "10",
                "Upload-Metadata": f"filename {encoded}",
            },
        )
        assert response.status in (201, 400), await response.text()
    for username in ("../admin", "a\x00b", "me", "x" * 5000, "ä" * 3):
        response = await stack.gateway.post(
            "/api/v1/users", json={"username": username, "password": "long enough pw"}
        )
        assert_refused(response.status, await response.text())
    for title in ("a\x00b", "\x00" * 10):
        video = await Publisher(stack, "t", auth).publish(title=title)
        assert video.status in (201, 400), await video.text()


# -- numbers that are not numbers -----------------------------------------------------

# Unicode digits pass str.isdigit() and \d but int() refuses some ("²"), and int() refuses
# any string of over 4,300 digits: each was a 500 until parsing took ASCII only.
NOT_NUMBERS = ["\u00b2", "\u0663", "1" * 5000, "-1", "1e3", " 5", "0x10", ""]


async def test_number_parameters_that_are_not_numbers(stack: Stack) -> None:
    auth = await stack.new_user()
    video = await Publisher(stack, "numbers", auth).video()
    queries = [
        ("/api/v1/videos", ("limit",)),
        (f"/api/v1/videos/{video['id']}/comments", ("limit",)),
        (f"/api/v1/videos/{video['id']}/danmaku", ("from_ms", "to_ms")),
        ("/api/v1/admin/queues/video-deletions/parked", ("limit",)),
    ]
    for path, names in queries:
        for raw in NOT_NUMBERS:
            url = stack.gateway.make_url(path).with_query(dict.fromkeys(names, raw))
            async with stack.gateway.session.get(url, headers=auth) as response:
                assert response.status < 500, (url, await response.text())
    stream = f"/api/v1/videos/{video['id']}/stream"
    for header in ("bytes=" + "1" * 5000 + "-", "bytes=-" + "9" * 5000, "bytes=\u0663-"):
        response = await stack.gateway.get(
            stream, headers={"Range": header.encode().decode("latin-1")}
        )
        assert response.status in (200, 206, 416), (header[:20], await response.text())
    for index in ("\u0663", "1" * 5000):
        response = await stack.gateway.put(
            f"/api/v1/uploads/01ZZZZZZZZZZZZZZZZZZZZZZZZ/chunks/{index}",
            data=b"x",
            headers={**auth, "X-Chunk-SHA256": "0" * 64},
        )
        assert_refused(response.status, await response.text())


# -- JSON bodies ---------------------------------------------------------------------------

JSON_ROUTES = [
    "/api/v1/users",
    "/api/v1/sessions",
    "/api/v1/sessions/refresh",
    "/api/v1/videos",
    "/api/v1/uploads",
    "/api/v1/videos/01ZZZZZZZZZZZZZZZZZZZZZZZZ/comments",
    "/api/v1/videos/01ZZZZZZZZZZZZZZZZZZZZZZZZ/danmaku",
    "/api/v1/uploads/01ZZZZZZZZZZZZZZZZZZZZZZZZ/complete",
]


async def test_a_10_mb_json_body_is_refused_before_it_is_read(hardened: Hardened) -> None:
    """413 after the headers and a first piece: the rest is never waited for."""
    auth = await hardened.stack.new_user()
    for path in JSON_ROUTES:
        reader, writer = await asyncio.open_connection(hardened.host, hardened.port)
        try:
            writer.write(
                (
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Authorization: {auth['Authorization']}\r\n"
                    f"Content-Length: {10 * 1024 * 1024}\r\n\r\n"
                ).encode()
                + b'{"a": "'
                + b"x" * 65536
            )
            await writer.drain()
            started = time.monotonic()
            status_line = await asyncio.wait_for(reader.readline(), timeout=5)
            assert time.monotonic() - started < 5
            assert status_line.split()[1] == b"413", (path, status_line)
        finally:
            writer.close()


async def test_a_large_chunked_json_body_is_413(stack: Stack) -> None:
    async def endless() -> Any:
        yield b'{"username": "'
        for _ in range(160):  # 10 MiB, never all needed
            yield b"x" * 65536

    response = await stack.gateway.post(
        "/api/v1/users", data=endless(), headers={"Content-Type": "application/json"}
    )
    await is_problem(response, 413, "payload_too_large")


async def test_deeply_nested_json_is_a_400(stack: Stack) -> None:
    auth = await stack.new_user()
    depth = 30_000  # 60 kB: under the JSON size limit, far past any parser's depth
    bodies = [
        b"[" * depth + b"]" * depth,
        b'{"a":' * depth + b"1" + b"}" * depth,
        b'{"username": ' + b"[" * depth + b"]" * depth + b', "password": "x"}',
    ]
    for path in JSON_ROUTES:
        for body in bodies:
            response = await stack.gateway.post(
                path, data=body, headers={**auth, "Content-Type": "application/json"}
            )
            text = await response.text()
            assert_refused(response.status, text)
            assert response.content_type == "application/problem+json", text


async def test_wrong_content_types_are_415(stack: Stack) -> None:
    auth = await stack.new_user()
    for path in JSON_ROUTES:
        for content_type in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/xml",
            "application/json-patch+json",
        ):
            response = await stack.gateway.post(
                path,
                data=b'{"username": "x"}',
                headers={**auth, "Content-Type": content_type},
            )
            await is_problem(response, 415, "unsupported_media_type")


# -- headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Big": "x" * 100_000},
        {"Authorization": "Bearer " + "x" * 100_000},
        {f"X-Many-{i}": "x" for i in range(500)},
        {"Cookie": "a=" + "b" * 20_000},
    ],
    ids=["one-huge-header", "huge-token", "too-many-headers", "huge-cookie"],
)
async def test_huge_headers_are_refused(hardened: Hardened, headers: dict[str, str]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(hardened.url("/api/v1/videos"), headers=headers) as response,
    ):
        assert response.status in (400, 431), response.status


# -- slow clients -------------------------------------------------------------------------


async def _dribble(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, piece: bytes, started: float
) -> tuple[float, bytes]:
    """Sends ``piece`` every 0.2 s until the server closes the connection.

    Returns how long that took since ``started`` (when the server's clock for this
    connection started, as near as the client can tell) and what the server sent before
    closing (b"" when it just closed: the slow-client bounds answer nothing).
    """
    answer = b""
    while time.monotonic() - started < HEADER_TIMEOUT + BODY_TIMEOUT + 10:
        try:
            writer.write(piece)
            await writer.drain()
            received = await asyncio.wait_for(reader.read(65536), timeout=0.2)
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - started, answer
        if not received:
            return time.monotonic() - started, answer
        answer += received
    raise AssertionError(f"the server never closed a client that dribbles ({answer[:100]!r})")


async def test_slow_headers_are_dropped_while_others_are_served(hardened: Hardened) -> None:
    slow = []
    for _ in range(20):
        reader, writer = await asyncio.open_connection(hardened.host, hardened.port)
        # Timed from the connection, not from the dribbling task's start: on a busy machine
        # the task may start late, and the server's header clock runs from the connection.
        slow.append((reader, writer, time.monotonic()))
        writer.write(b"GET /api/v1/videos HTTP/1.1\r\nHost: x\r\n")
    dribblers = [
        asyncio.create_task(_dribble(writer, reader, b"X-a: b\r\n", connected))
        for reader, writer, connected in slow
    ]
    # Meanwhile the gateway keeps answering everyone else.
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.get(hardened.url("/api/v1/videos")) as response:
                assert response.status == 200
    results = await asyncio.gather(*dribblers)
    for _reader, writer, _connected in slow:
        writer.close()
    held = [elapsed for elapsed, _answer in results]
    assert max(held) < HEADER_TIMEOUT + SLACK, held
    assert min(held) >= HEADER_TIMEOUT * 0.9, held
    assert {answer for _elapsed, answer in results} == {b""}


async def test_a_silent_connection_is_dropped(hardened: Hardened) -> None:
    reader, writer = await asyncio.open_connection(hardened.host, hardened.port)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), timeout=HEADER_TIMEOUT + SLACK) == b""
    assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9
    writer.close()


@pytest.mark.parametrize("route", ["sign-up", "chunk"])
async def test_a_slow_body_is_dropped_while_others_are_served(
    hardened: Hardened, route: str
) -> None:
    """One byte every 0.2 s: each wait is under the idle timeout, but at 5 B/s the rate
    floor (1000 B/s) runs out just after ``BODY_TIMEOUT`` of waiting."""
    auth = await hardened.stack.new_user()
    if route == "sign-up":
        head = "POST /api/v1/users HTTP/1.1\r\nContent-Type: application/json\r\n"
    else:
        upload = await Uploader(hardened.stack, auth).start(os.urandom(1000))
        head = (
            f"PUT /api/v1/uploads/{upload['upload_id']}/chunks/0 HTTP/1.1\r\n"
            f"Content-Type: application/octet-stream\r\nX-Chunk-SHA256: {'0' * 64}\r\n"
        )
    reader, writer = await asyncio.open_connection(hardened.host, hardened.port)
    writer.write(
        (
            f"{head}Host: x\r\nAuthorization: {auth['Authorization']}\r\n"
            "Content-Length: 1000\r\n\r\n"
        ).encode()
    )
    dribbler = asyncio.create_task(_dribble(writer, reader, b"x", time.monotonic()))
    async with (
        aiohttp.ClientSession() as session,
        session.get(hardened.url("/api/v1/videos")) as response,
    ):
        assert response.status == 200
    held, answer = await dribbler
    writer.close()
    assert answer == b""
    assert BODY_TIMEOUT * 0.9 <= held < BODY_TIMEOUT + SLACK, held


async def test_a_stalled_body_is_dropped(hardened: Hardened) -> None:
    reader, writer = await asyncio.open_connection(hardened.host, hardened.port)
    writer.write(
        b"POST /api/v1/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"username": '
    )
    await writer.drain()
    started = time.monotonic()
    # Closed without an answer once the body has not moved for BODY_TIMEOUT.
    answer = await asyncio.wait_for(reader.read(), timeout=BODY_TIMEOUT + SLACK)
    assert answer == b""
    assert BODY_TIMEOUT * 0.9 <= time.monotonic() - started < BODY_TIMEOUT + SLACK
    writer.close()


async def test_a_fast_large_body_is_not_held_against_the_client(hardened: Hardened) -> None:
    """The pacing counts only waiting for the client: a big upload at speed goes through."""
    auth = await hardened.stack.new_user()
    publisher = Publisher(hardened.stack, "fast", auth)
    upload_id = await publisher.upload(os.urandom(3 * 1024 * 1024))
    assert upload_id


# -- WebSocket ---------------------------------------------------------------------------


async def test_an_oversized_websocket_frame_is_closed_with_1009(hardened: Hardened) -> None:
    stack = hardened.stack
    auth = await stack.new_user()
    video = await Publisher(stack, "ws", auth).video()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            hardened.url(f"/api/v1/videos/{video['id']}/live"),
            headers=auth,
            max_msg_size=0,
        ) as ws,
    ):
        await ws.send_str("x" * (WEBSOCKET_MAX_MESSAGE_BYTES + 1))
        assert await _close_code(ws) == 1009


# -- IDOR: owner-only routes ------------------------------------------------------------


async def test_owner_only_routes_refuse_others_and_anonymous(stack: Stack) -> None:
    """Every owner-only route: another signed-in user gets 403, an anonymous caller 401."""
    owner = Publisher(stack, "owner", await stack.new_user())
    video = await owner.video()
    comment = await stack.gateway.post(
        f"/api/v1/videos/{video['id']}/comments", json={"content": "mine"}, headers=owner.auth
    )
    assert comment.status == 201, await comment.text()
    comment_id = (await comment.json())["id"]
    data = os.urandom(1000)
    in_progress = await owner.uploader.start(data)
    finished_upload = await owner.upload()
    upload_id = in_progress["upload_id"]
    tus = {"Tus-Resumable": "1.0.0"}
    created = await stack.gateway.post(
        "/api/v1/tus/", headers={**owner.auth, **tus, "Upload-Length": "1000"}
    )
    assert created.status == 201, await created.text()
    tus_path = "/api/v1/tus/" + created.headers["Location"].rstrip("/").rsplit("/", 1)[-1]
    stranger = await stack.new_user()

    json_body = {"title": "stolen"}
    # (method, path, JSON body or raw bytes, status for a stranger)
    matrix: list[tuple[str, str, Any, int]] = [
        ("PATCH", f"/api/v1/videos/{video['id']}", json_body, 403),
        ("DELETE", f"/api/v1/videos/{video['id']}", None, 403),
        ("DELETE", f"/api/v1/videos/{video['id']}/comments/{comment_id}", None, 403),
        ("POST", "/api/v1/videos", {"title": "t", "upload_id": finished_upload}, 403),
        ("GET", f"/api/v1/uploads/{upload_id}", None, 403),
        ("PUT", f"/api/v1/uploads/{upload_id}/chunks/0", data, 403),
        ("POST", f"/api/v1/uploads/{upload_id}/complete", {}, 403),
        ("DELETE", f"/api/v1/uploads/{upload_id}", None, 403),
        ("HEAD", tus_path, None, 403),
        ("PATCH", tus_path, b"x" * 10, 403),
        ("DELETE", tus_path, None, 403),
        ("GET", "/api/v1/admin/queues", None, 403),
        ("GET", "/api/v1/admin/queues/video-deletions/parked", None, 403),
        ("POST", "/api/v1/admin/queues/video-deletions/parked/requeue", None, 403),
        ("GET", f"/api/v1/admin/deletions/{video['id']}", None, 403),
    ]
    for method, path, body, stranger_status in matrix:
        kwargs: dict[str, Any] = {}
        extra: dict[str, str] = {}
        if path.startswith("/api/v1/tus/"):
            extra = {**tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
            kwargs["data"] = body
        elif isinstance(body, bytes):
            kwargs["data"] = body
            extra["X-Chunk-SHA256"] = sha256(body)
        elif body is not None:
            kwargs["json"] = body
        for who, expected in ((stranger, stranger_status), ({}, 401)):
            response = await stack.gateway.request(method, path, headers={**who, **extra}, **kwargs)
            body_text = await response.text()
            assert response.status == expected, (method, path, "as", who or "anonymous", body_text)
            if method != "HEAD":  # a HEAD answer has no body to be a problem document
                assert response.content_type == "application/problem+json", body_text
    # A signed-in user's own routes, anonymously.
    for method, path in (("GET", "/api/v1/users/me"), ("DELETE", "/api/v1/sessions")):
        response = await stack.gateway.request(method, path)
        assert response.status == 401, await response.text()
    # Nothing the others tried took effect.
    after = await (await stack.gateway.get(f"/api/v1/videos/{video['id']}")).json()
    assert after["title"] == video["title"]
    assert (await owner.uploader.get(upload_id)).status == 200
    still_there = await stack.gateway.head(tus_path, headers={**owner.auth, **tus})
    assert still_there.headers["Upload-Offset"] == "0"
    comments = await (await stack.gateway.get(f"/api/v1/videos/{video['id']}/comments")).json()
    assert [c["id"] for c in comments["items"]] == [comment_id]


async def _close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    message = await asyncio.wait_for(ws.receive(), timeout=5)
    while message.type not in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
        message = await asyncio.wait_for(ws.receive(), timeout=5)
    return message.data if message.type == WSMsgType.CLOSE else ws.close_code


async def test_hostile_live_messages_get_an_error_or_a_close(stack: Stack) -> None:
    auth = await stack.new_user()
    video = await Publisher(stack, "wsapi", auth).video()
    live = f"/api/v1/videos/{video['id']}/live"
    async with stack.gateway.ws_connect(live, headers=auth) as ws:
        # Deeply nested JSON, under the api's 4 KiB frame limit: refused, socket kept.
        await ws.send_str("[" * 2000 + "]" * 2000)
        reply = await asyncio.wait_for(ws.receive_json(), timeout=5)
        assert reply["type"] == "error"
        assert reply["code"] == "malformed_json"
        await ws.send_str("\x00" * 100)
        reply = await asyncio.wait_for(ws.receive_json(), timeout=5)
        assert reply["code"] == "malformed_json"
        # Over the api's own limit (but under the gateway's): the api's 1009 reaches us.
        await ws.send_str("x" * 5000)
        assert await _close_code(ws) == 1009
