"""tus 1.0.0 through the gateway, on embedded back ends: the protocol as a stock client
sees it, and what the server keeps (blobs, Redis, the database) after each step.

Files are a little over one 4 MiB hash block, sent in PATCHes of odd lengths, so the
content hash has two blocks and no PATCH lines up with one.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import select

from api_service.app import create_app as create_api_app
from gateway.app import create_app as create_gateway_app
from scheduler_service.app import create_app as create_scheduler_app
from scheduler_service.jobs.upload_sweeper import AbandonedUploadSweeper
from shared.content_hash import content_hash
from shared.db import Database, open_database
from shared.db.schema import uploads
from shared.layout import upload_state_key
from shared.resources import BLOBS, KV
from shared.settings import Settings
from shared.web import METRICS
from stream_service.app import create_app as create_stream_app
from stream_service.tus.keys import TUS
from stream_service.tus.state import (
    AppendOutcome,
    TusStateStore,
    segment_blob_key,
    tus_segments_key,
)
from tests.api.test_uploads import blob_path, completed_events, settle_uploads, stored_files
from tests.clients import MIB
from tests.problems import problem
from tests.stack import Stack, start_stack

FILE_SIZE = 5 * MIB + 12_345
TUS_HEADERS = {"Tus-Resumable": "1.0.0"}
PATCH_TYPE = {"Content-Type": "application/offset+octet-stream"}


def metadata(**pairs: str) -> str:
    return ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs.items()
    )


class TusClient:
    """One signed-in tus client, through the gateway (paths only: the test client's)."""

    def __init__(self, stack: Stack, auth: dict[str, str]) -> None:
        self.gateway = stack.gateway
        self.auth = auth

    def headers(self, **extra: str) -> dict[str, str]:
        return {**TUS_HEADERS, **self.auth, **extra}

    async def create(
        self, length: int, *, body: bytes | None = None, extra: dict[str, str] | None = None
    ) -> Any:
        headers = self.headers(**{"Upload-Length": str(length), **(extra or {})})
        if body is not None:
            headers |= PATCH_TYPE
        return await self.gateway.post(
            "/api/v1/tus/", data=None if body is None else io.BytesIO(body), headers=headers
        )

    async def start(self, length: int, extra: dict[str, str] | None = None) -> str:
        """The new upload's path."""
        response = await self.create(length, extra=extra)
        assert response.status == 201, await response.text()
        return str(urlsplit(response.headers["Location"]).path)

    async def head(self, path: str) -> Any:
        return await self.gateway.head(path, headers=self.headers())

    async def offset(self, path: str) -> int:
        response = await self.head(path)
        assert response.status == 200, response.status
        return int(response.headers["Upload-Offset"])

    async def patch(self, path: str, offset: int, body: bytes, **extra: str) -> Any:
        headers = self.headers(**{**PATCH_TYPE, "Upload-Offset": str(offset), **extra})
        return await self.gateway.patch(path, data=io.BytesIO(body), headers=headers)

    async def send(self, path: str, data: bytes, cuts: list[int]) -> Any:
        """PATCHes ``data`` in pieces ending at ``cuts`` (and the end); the last answer."""
        response = None
        start = 0
        for end in [*cuts, len(data)]:
            response = await self.patch(path, start, data[start:end])
            assert response.status == 204, await response.text()
            assert int(response.headers["Upload-Offset"]) == end
            start = end
        return response

    async def upload(self, data: bytes) -> str:
        """A whole file; the upload id."""
        path = await self.start(len(data))
        await self.send(path, data, [len(data) // 3])
        return path.rsplit("/", 1)[1]


@pytest.fixture
async def alice(stack: Stack) -> TusClient:
    return TusClient(stack, await stack.new_user())


@pytest.fixture
async def bob(stack: Stack) -> TusClient:
    return TusClient(stack, await stack.new_user())


@pytest.fixture
def blob_root(stack: Stack) -> Path:
    return Path(urlsplit(stack.settings.blob_url).path)


@pytest.fixture
async def database(stack: Stack) -> Any:
    db = await open_database(stack.settings.db_url)
    yield db
    await db.close()


def upload_files(root: Path, path: str) -> list[Path]:
    return stored_files(root, "uploads/" + path.rsplit("/", 1)[1])


async def tus_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.headers["Tus-Resumable"] == "1.0.0"
    return await problem(response, status, code)


# -- discovery and the happy path -------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/tus/", "/api/v1/tus", "/api/v1/tus/01ABC"])
async def test_options_says_what_the_server_speaks(stack: Stack, path: str) -> None:
    response = await stack.gateway.options(path)
    assert response.status == 204
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert response.headers["Tus-Version"] == "1.0.0"
    assert set(response.headers["Tus-Extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "expiration",
        "checksum",
        "termination",
    }
    assert response.headers["Tus-Max-Size"] == str(stack.settings.max_upload_bytes)
    assert response.headers["Tus-Checksum-Algorithm"] == "sha1,sha256"


async def test_upload_in_odd_patches_publish_and_stream_it_back(
    stack: Stack, alice: TusClient, blob_root: Path, database: Database
) -> None:
    data = os.urandom(FILE_SIZE)
    before = datetime.now(UTC)
    response = await alice.create(
        len(data), extra={"Upload-Metadata": metadata(filename="holiday.mp4", filetype="video/mp4")}
    )
    assert response.status == 201, await response.text()
    location = response.headers["Location"]
    # Relative (no VOD_PUBLIC_URL here): the client resolves it against where it posted.
    assert location.startswith("/api/v1/tus/")
    path = urlsplit(location).path
    upload_id = path.rsplit("/", 1)[1]
    assert response.headers["Upload-Offset"] == "0"
    expires = parsedate_to_datetime(response.headers["Upload-Expires"])
    assert before + timedelta(hours=23) < expires <= datetime.now(UTC) + timedelta(hours=24)

    head = await alice.head(path)
    assert head.status == 200
    assert head.headers["Upload-Offset"] == "0"
    assert head.headers["Upload-Length"] == str(len(data))
    assert head.headers["Cache-Control"] == "no-store"
    assert head.headers["Tus-Resumable"] == "1.0.0"
    assert head.headers["Upload-Metadata"] == metadata(filename="holiday.mp4", filetype="video/mp4")

    # Not complete yet: the native API points at tus, a video cannot be made of it.
    await problem(
        await stack.gateway.get(f"/api/v1/uploads/{upload_id}", headers=alice.auth),
        409,
        "tus_upload_in_progress",
    )
    publish = {"title": "Holiday", "upload_id": upload_id}
    await problem(
        await stack.gateway.post("/api/v1/videos", json=publish, headers=alice.auth),
        409,
        "upload_incomplete",
    )

    last = await alice.send(path, data, [1, 3 * MIB + 7, 4 * MIB + 1])
    assert "Upload-Expires" not in last.headers
    head = await alice.head(path)
    assert (head.headers["Upload-Offset"], head.headers["Upload-Length"]) == (str(len(data)),) * 2

    # The native machinery finished it: the file under its content hash, segments gone,
    # the durable record and its event.
    assert blob_path(blob_root, data).read_bytes() == data
    await settle_uploads(stack)  # the segments go after the answer
    assert upload_files(blob_root, path) == []
    async with database.connect() as conn:
        row = (
            (await conn.execute(select(uploads).where(uploads.c.id == upload_id))).mappings().one()
        )
    assert (row["state"], row["size"], row["content_hash"], row["filename"]) == (
        "complete",
        len(data),
        content_hash(data),
        "holiday.mp4",
    )
    events = await completed_events(database)
    assert [(e["upload_id"], e["content_hash"]) for e in events] == [
        (upload_id, content_hash(data))
    ]

    response = await stack.gateway.post("/api/v1/videos", json=publish, headers=alice.auth)
    assert response.status == 201, await response.text()
    video = await response.json()
    assert (video["size"], video["content_hash"]) == (len(data), content_hash(data))
    streamed = await stack.gateway.get(video["stream_url"])
    assert streamed.status == 200
    assert await streamed.read() == data


async def test_location_never_follows_the_clients_host(stack: Stack, alice: TusClient) -> None:
    """Issue 19, point 14: the Location was built from the client's Host header."""
    for extra in ({"Host": "evil.example"}, {"Host": "evil.example:443"}, {}):
        response = await alice.create(1000, extra=extra)
        assert response.status == 201, await response.text()
        location = response.headers["Location"]
        assert "evil" not in location
        assert re.fullmatch(r"/api/v1/tus/[0-9A-Za-z]+", location), location
        assert (await alice.head(location)).status == 200


async def test_location_is_under_the_configured_public_url(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Any
) -> None:
    stack = await start_stack(
        make_settings(VOD_PUBLIC_URL="https://vod.example.com/prefix/"),
        aiohttp_server,
        aiohttp_client,
    )
    client = TusClient(stack, await stack.new_user())
    response = await client.create(1000, extra={"Host": "evil.example"})
    assert response.status == 201, await response.text()
    location = response.headers["Location"]
    assert re.fullmatch(r"https://vod\.example\.com/prefix/api/v1/tus/[0-9A-Za-z]+", location)


async def test_creation_with_upload_takes_the_first_bytes(
    alice: TusClient, blob_root: Path
) -> None:
    data = os.urandom(FILE_SIZE)
    response = await alice.create(len(data), body=data[: 2 * MIB])
    assert response.status == 201, await response.text()
    assert response.headers["Upload-Offset"] == str(2 * MIB)
    path = urlsplit(response.headers["Location"]).path
    assert await alice.offset(path) == 2 * MIB
    response = await alice.patch(path, 2 * MIB, data[2 * MIB :])
    assert response.status == 204, await response.text()
    assert response.headers["Upload-Offset"] == str(len(data))
    assert blob_path(blob_root, data).read_bytes() == data


async def test_creation_with_the_whole_file_completes_it(alice: TusClient, blob_root: Path) -> None:
    data = os.urandom(MIB)
    response = await alice.create(len(data), body=data)
    assert response.status == 201, await response.text()
    assert response.headers["Upload-Offset"] == str(len(data))
    assert "Upload-Expires" not in response.headers
    assert blob_path(blob_root, data).read_bytes() == data


# -- protocol errors: tus's status codes, vod's problem documents ---------------------------


@pytest.mark.parametrize("version", [None, "0.2.2", "1.0"])
async def test_unsupported_tus_version_is_412(alice: TusClient, version: str | None) -> None:
    path = await alice.start(10)
    headers = {**alice.auth, "Upload-Length": "10"}
    if version is not None:
        headers["Tus-Resumable"] = version
    for response in (
        await alice.gateway.post("/api/v1/tus/", headers=headers),
        await alice.gateway.head(path, headers=headers),
        await alice.gateway.patch(
            path, data=b"x", headers={**headers, **PATCH_TYPE, "Upload-Offset": "0"}
        ),
        await alice.gateway.delete(path, headers=headers),
    ):
        assert response.status == 412
        assert response.headers["Tus-Version"] == "1.0.0"
        assert response.headers["Tus-Resumable"] == "1.0.0"
        if response.method != "HEAD":
            await tus_problem(response, 412, "tus_version_unsupported")
    assert await alice.offset(path) == 0


async def test_patch_at_the_wrong_offset_is_409_and_stores_nothing(
    alice: TusClient, blob_root: Path
) -> None:
    path = await alice.start(100)
    assert (await alice.patch(path, 0, b"a" * 10)).status == 204
    for wrong in (0, 5, 11, 100):
        body = await tus_problem(
            await alice.patch(path, wrong, b"b" * 10), 409, "upload_offset_mismatch"
        )
        assert body["expected_offset"] == 10
    assert await alice.offset(path) == 10
    assert len(upload_files(blob_root, path)) == 1


async def test_patch_needs_the_tus_content_type(alice: TusClient) -> None:
    path = await alice.start(100)
    headers = alice.headers(**{"Upload-Offset": "0", "Content-Type": "application/octet-stream"})
    response = await alice.gateway.patch(path, data=b"x" * 10, headers=headers)
    await tus_problem(response, 415, "unsupported_media_type")
    assert await alice.offset(path) == 0


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "upload_length_required"),
        ({"Upload-Length": "-1"}, "invalid_upload_length"),
        ({"Upload-Length": "ten"}, "invalid_upload_length"),
        ({"Upload-Length": "0"}, "validation_failed"),
        ({"Upload-Defer-Length": "1"}, "upload_defer_length_unsupported"),
        ({"Upload-Length": "5", "Upload-Metadata": "filename !!!"}, "invalid_upload_metadata"),
        ({"Upload-Length": "5", "Upload-Metadata": "a b,a b"}, "invalid_upload_metadata"),
        (
            {"Upload-Length": "5", "Upload-Metadata": metadata(filename="../etc")},
            "validation_failed",
        ),
    ],
)
async def test_bad_creation_headers_are_400(
    alice: TusClient, headers: dict[str, str], code: str
) -> None:
    response = await alice.gateway.post("/api/v1/tus/", headers=alice.headers(**headers))
    await tus_problem(response, 400, code)


async def test_over_the_maximum_size_is_413(stack: Stack, alice: TusClient) -> None:
    response = await alice.create(stack.settings.max_upload_bytes + 1)
    body = await tus_problem(response, 413, "upload_too_large")
    assert body["max_bytes"] == stack.settings.max_upload_bytes


async def test_bytes_past_the_length_are_refused_whole(alice: TusClient, blob_root: Path) -> None:
    path = await alice.start(100)
    assert (await alice.patch(path, 0, b"a" * 60)).status == 204
    await tus_problem(await alice.patch(path, 60, b"b" * 41), 413, "upload_length_exceeded")
    assert await alice.offset(path) == 60
    assert len(upload_files(blob_root, path)) == 1


# -- checksum -------------------------------------------------------------------------------


def upload_checksum(algorithm: str, body: bytes) -> str:
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, body).digest()).decode()}"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
async def test_checksum_checked_and_a_mismatch_stores_nothing(
    alice: TusClient, blob_root: Path, algorithm: str
) -> None:
    data = os.urandom(3 * MIB)
    path = await alice.start(len(data))
    first, second = data[: 2 * MIB], data[2 * MIB :]
    good = await alice.patch(
        path, 0, first, **{"Upload-Checksum": upload_checksum(algorithm, first)}
    )
    assert good.status == 204, await good.text()
    stored = upload_files(blob_root, path)

    wrong = upload_checksum(algorithm, second[:-1] + b"?")
    response = await alice.patch(path, 2 * MIB, second, **{"Upload-Checksum": wrong})
    await tus_problem(response, 460, "checksum_mismatch")
    assert await alice.offset(path) == 2 * MIB
    assert upload_files(blob_root, path) == stored  # not even a temporary file

    right = upload_checksum(algorithm, second)
    response = await alice.patch(path, 2 * MIB, second, **{"Upload-Checksum": right})
    assert response.status == 204
    assert blob_path(blob_root, data).read_bytes() == data


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("md5 1B2M2Y8AsgTpgAmY7PhCfg==", "checksum_algorithm_unsupported"),
        ("sha1 not-base64!", "invalid_upload_checksum"),
        ("sha256 " + base64.b64encode(b"short").decode(), "invalid_upload_checksum"),
    ],
)
async def test_bad_checksum_headers_are_400(alice: TusClient, value: str, code: str) -> None:
    path = await alice.start(10)
    response = await alice.patch(path, 0, b"x" * 10, **{"Upload-Checksum": value})
    await tus_problem(response, 400, code)
    assert await alice.offset(path) == 0


# -- auth and ownership ---------------------------------------------------------------------


async def test_anonymous_is_401_and_others_are_403(
    stack: Stack, alice: TusClient, bob: TusClient
) -> None:
    path = await alice.start(100)
    anonymous = {**TUS_HEADERS, "Upload-Length": "100"}
    await tus_problem(
        await stack.gateway.post("/api/v1/tus/", headers=anonymous), 401, "unauthorized"
    )
    assert (await stack.gateway.head(path, headers=TUS_HEADERS)).status == 401

    assert (await bob.head(path)).status == 403
    await tus_problem(await bob.patch(path, 0, b"x" * 10), 403, "upload_forbidden")
    await tus_problem(
        await bob.gateway.delete(path, headers=bob.headers()), 403, "upload_forbidden"
    )
    assert await alice.offset(path) == 0


async def test_unknown_upload_is_404(alice: TusClient) -> None:
    assert (await alice.head("/api/v1/tus/01NOSUCHUPLOAD")).status == 404
    response = await alice.patch("/api/v1/tus/01NOSUCHUPLOAD", 0, b"x")
    await tus_problem(response, 404, "upload_not_found")


# -- termination, expiration, dedup, quota ---------------------------------------------------


async def test_delete_drops_the_upload_and_its_bytes(
    stack: Stack, alice: TusClient, blob_root: Path
) -> None:
    path = await alice.start(100)
    assert (await alice.patch(path, 0, b"a" * 40)).status == 204
    assert upload_files(blob_root, path)
    response = await alice.gateway.delete(path, headers=alice.headers())
    assert response.status == 204
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert (await alice.head(path)).status == 404
    await tus_problem(await alice.patch(path, 40, b"b"), 404, "upload_not_found")
    assert upload_files(blob_root, path) == []
    upload_id = path.rsplit("/", 1)[1]
    kv = stack.servers["stream"].app[KV]
    assert not await kv.exists(upload_state_key(upload_id))
    assert not await kv.exists(tus_segments_key(upload_id))


async def test_finished_upload_cannot_be_terminated(alice: TusClient) -> None:
    data = os.urandom(1000)
    upload_id = await alice.upload(data)
    path = f"/api/v1/tus/{upload_id}"
    await tus_problem(
        await alice.gateway.delete(path, headers=alice.headers()), 409, "upload_complete"
    )
    assert await alice.offset(path) == len(data)


async def test_expired_upload_is_410_then_404_and_swept(
    stack: Stack, alice: TusClient, blob_root: Path
) -> None:
    path = await alice.start(100)
    upload_id = path.rsplit("/", 1)[1]
    assert (await alice.patch(path, 0, b"a" * 40)).status == 204
    app = stack.servers["stream"].app
    kv = app[KV]
    # Redis forgets the upload when Upload-Expires passes: the TTL is the same 24 h.
    ttl_ms = await kv.pttl(upload_state_key(upload_id))
    assert 23 * 3600 * 1000 < ttl_ms <= 24 * 3600 * 1000
    assert 23 * 3600 * 1000 < await kv.pttl(tus_segments_key(upload_id)) <= 24 * 3600 * 1000

    # Past Upload-Expires while Redis still holds it (clocks differ by a little): Gone.
    service = app[TUS]
    real_clock = service.clock
    service.clock = lambda: real_clock() + timedelta(hours=25)
    try:
        assert (await alice.head(path)).status == 410
        await tus_problem(await alice.patch(path, 40, b"b" * 10), 410, "upload_expired")
    finally:
        service.clock = real_clock

    # What Redis does when the TTL runs out; then the sweeper finds the segments orphaned.
    await kv.delete(upload_state_key(upload_id), tus_segments_key(upload_id))
    assert (await alice.head(path)).status == 404
    assert upload_files(blob_root, path)
    swept = await AbandonedUploadSweeper(app[BLOBS], kv, min_age=timedelta(0)).run()
    assert swept == 1
    assert upload_files(blob_root, path) == []


async def test_same_file_twice_is_stored_once(
    alice: TusClient, bob: TusClient, blob_root: Path, database: Database
) -> None:
    data = os.urandom(FILE_SIZE)
    first = await alice.upload(data)
    second = await bob.upload(data)
    assert first != second
    assert blob_path(blob_root, data).read_bytes() == data
    assert len(stored_files(blob_root, "blobs")) == 1
    events = await completed_events(database)
    assert {e["upload_id"] for e in events} == {first, second}
    assert {e["content_hash"] for e in events} == {content_hash(data)}


async def test_quota_counts_tus_uploads(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    stack = await start_stack(
        make_settings(VOD_USER_QUOTA_BYTES=str(MIB)), aiohttp_server, aiohttp_client
    )
    carol = TusClient(stack, await stack.new_user())
    await carol.start(MIB - 100)
    body = await tus_problem(await carol.create(200), 413, "quota_exceeded")
    assert body["remaining_bytes"] == 100
    assert (await carol.create(100)).status == 201


# -- a PATCH cut off mid-body ---------------------------------------------------------------


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Polls ``condition`` (state outside the test's control) for at most 10 s."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def raw_patch(
    stack: Stack, alice: TusClient, path: str, length: int, sent: bytes, **extra: str
) -> asyncio.StreamWriter:
    """A PATCH announcing ``length`` bytes of which only ``sent`` go out (so far)."""
    gateway = stack.servers["gateway"]
    headers = alice.headers(
        **PATCH_TYPE, **{"Upload-Offset": "0", "Content-Length": str(length)}, **extra
    )
    head = f"PATCH {path} HTTP/1.1\r\nHost: {gateway.host}:{gateway.port}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    _, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(head.encode() + sent)
    await writer.drain()
    return writer


async def test_cut_patch_keeps_what_arrived_and_resumes(
    stack: Stack, alice: TusClient, blob_root: Path
) -> None:
    data = os.urandom(FILE_SIZE)
    path = await alice.start(len(data))
    service = stack.servers["stream"].app[TUS]
    sent = 4 * MIB + MIB // 2
    writer = await raw_patch(stack, alice, path, len(data), data[:sent])

    def segment_bytes() -> int:
        return sum(file.stat().st_size for file in upload_files(blob_root, path))

    # Cut once the stream service has written part of it (the local store writes 4 MiB
    # at a time), so something must be kept.
    await wait_until(lambda: segment_bytes() >= MIB, "the first bytes to reach storage")
    writer.transport.abort()
    await wait_until(lambda: service.in_flight == 0, "the cut PATCH to be stored")

    offset = await alice.offset(path)
    assert MIB <= offset <= sent
    response = await alice.patch(path, offset, data[offset:])
    assert response.status == 204, await response.text()
    assert blob_path(blob_root, data).read_bytes() == data


async def test_cut_patch_with_a_checksum_keeps_nothing(
    stack: Stack, alice: TusClient, blob_root: Path
) -> None:
    data = os.urandom(3 * MIB)
    path = await alice.start(len(data))
    service = stack.servers["stream"].app[TUS]
    checksum = {"Upload-Checksum": upload_checksum("sha256", data)}
    writer = await raw_patch(stack, alice, path, len(data), data[: 2 * MIB], **checksum)
    await wait_until(lambda: service.in_flight == 1, "the PATCH to reach the stream service")
    writer.transport.abort()
    await wait_until(lambda: service.in_flight == 0, "the cut PATCH to end")
    assert await alice.offset(path) == 0
    assert upload_files(blob_root, path) == []


# -- browsers, and the real back ends ---------------------------------------------------


async def test_a_browser_reads_the_tus_headers(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    origin = "https://uploader.example.com"
    stack = await start_stack(
        make_settings(VOD_CORS_ORIGINS=origin), aiohttp_server, aiohttp_client
    )
    alice = TusClient(stack, await stack.new_user())
    preflight = await stack.gateway.options(
        "/api/v1/tus/",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, tus-resumable, upload-length, "
            "upload-metadata, upload-checksum, upload-offset, content-type",
        },
    )
    assert preflight.status == 204
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    for name in ("tus-resumable", "upload-length", "upload-metadata", "upload-offset"):
        assert name in allowed

    created = await alice.create(
        10, extra={"Origin": origin, "Upload-Metadata": metadata(filename="a")}
    )
    assert created.status == 201
    head = await stack.gateway.head(
        urlsplit(created.headers["Location"]).path, headers=alice.headers(Origin=origin)
    )
    for response in (created, head):
        assert response.headers["Access-Control-Allow-Origin"] == origin
        exposed = {
            name.strip().lower()
            for name in response.headers["Access-Control-Expose-Headers"].split(",")
        }
        assert {
            "tus-resumable",
            "upload-offset",
            "upload-length",
            "upload-expires",
            "upload-metadata",
            "location",
            "tus-version",
            "tus-extension",
            "tus-max-size",
        } <= exposed


@pytest.mark.integration
async def test_on_mariadb_redis_and_rabbitmq(real_stack: Stack) -> None:
    alice = TusClient(real_stack, await real_stack.new_user())
    data = os.urandom(FILE_SIZE)
    path = await alice.start(len(data), {"Upload-Metadata": metadata(filename="real.mp4")})
    assert (await alice.patch(path, 0, data[:MIB])).status == 204
    await tus_problem(await alice.patch(path, 0, data[:MIB]), 409, "upload_offset_mismatch")
    wrong = upload_checksum("sha256", b"other bytes")
    await tus_problem(
        await alice.patch(path, MIB, data[MIB:], **{"Upload-Checksum": wrong}),
        460,
        "checksum_mismatch",
    )
    right = upload_checksum("sha256", data[MIB:])
    response = await alice.patch(path, MIB, data[MIB:], **{"Upload-Checksum": right})
    assert response.status == 204, await response.text()
    upload_id = path.rsplit("/", 1)[1]
    response = await real_stack.gateway.post(
        "/api/v1/videos", json={"title": "Real", "upload_id": upload_id}, headers=alice.auth
    )
    assert response.status == 201, await response.text()
    video = await response.json()
    assert video["content_hash"] == content_hash(data)
    assert await (await real_stack.gateway.get(video["stream_url"])).read() == data

    doomed = await alice.start(100)
    assert (await alice.patch(doomed, 0, b"x" * 10)).status == 204
    assert (await alice.gateway.delete(doomed, headers=alice.headers())).status == 204
    assert (await alice.head(doomed)).status == 404


# -- streaming, replicas, restarts ----------------------------------------------------------


async def test_a_patch_body_is_stored_while_it_arrives(alice: TusClient, blob_root: Path) -> None:
    """The server writes the first bytes before the client sends the last: bodies are
    streamed to storage, never gathered whole in memory first."""
    data = os.urandom(12 * MIB)
    path = await alice.start(len(data))

    def stored_bytes() -> int:
        return sum(file.stat().st_size for file in upload_files(blob_root, path))

    async def body() -> AsyncIterator[bytes]:
        yield data[: 8 * MIB]
        await wait_until(lambda: stored_bytes() >= 4 * MIB, "bytes in storage mid-body")
        yield data[8 * MIB :]

    headers = alice.headers(**PATCH_TYPE, **{"Upload-Offset": "0"})
    response = await alice.gateway.patch(path, data=body(), headers=headers)
    assert response.status == 204, await response.text()
    assert blob_path(blob_root, data).read_bytes() == data


def uploaded_bytes(server: TestServer) -> float:
    registry = server.app[METRICS].registry
    return registry.get_sample_value("vod_uploaded_bytes_total", {"service": "stream"}) or 0.0


async def test_two_replicas_share_an_upload_and_a_restart_loses_nothing(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    replicas = [await aiohttp_server(create_stream_app(settings)) for _ in range(2)]
    others = {
        "api": await aiohttp_server(create_api_app(settings)),
        "scheduler": await aiohttp_server(create_scheduler_app(settings)),
    }

    def url(server: TestServer) -> str:
        return str(server.make_url("")).rstrip("/")

    gateway_settings = dataclasses.replace(
        settings,
        api_url=url(others["api"]),
        scheduler_url=url(others["scheduler"]),
        stream_url=",".join(url(replica) for replica in replicas),
    )
    gateway = await aiohttp_server(create_gateway_app(gateway_settings))
    stack = Stack(gateway=await aiohttp_client(gateway), settings=gateway_settings, servers=others)
    alice = TusClient(stack, await stack.new_user())
    data = os.urandom(FILE_SIZE)
    path = await alice.start(len(data))
    cuts = [MIB, 2 * MIB, 3 * MIB, 4 * MIB, len(data)]

    # Round robin: consecutive PATCHes of one upload land on both replicas.
    for start, end in itertools.pairwise([0, *cuts[:2]]):
        assert (await alice.patch(path, start, data[start:end])).status == 204
    assert [uploaded_bytes(replica) for replica in replicas] == [MIB, MIB]

    # A replica goes away and comes back as a new process on its port (nothing of the
    # upload was in its memory); the other goes away too, so the new one must serve.
    first_port = replicas[0].port
    await replicas[0].close()
    assert (await alice.patch(path, cuts[1], data[cuts[1] : cuts[2]])).status == 204
    restarted = await aiohttp_server(create_stream_app(settings), port=first_port)
    await replicas[1].close()
    assert await alice.offset(path) == cuts[2]
    for start, end in itertools.pairwise(cuts[2:]):
        response = await alice.patch(path, start, data[start:end])
        assert response.status == 204, await response.text()
    assert uploaded_bytes(restarted) == len(data) - cuts[2]

    upload_id = path.rsplit("/", 1)[1]
    response = await stack.gateway.post(
        "/api/v1/videos", json={"title": "Relay", "upload_id": upload_id}, headers=alice.auth
    )
    assert response.status == 201, await response.text()
    video = await response.json()
    assert await (await stack.gateway.get(video["stream_url"])).read() == data


async def test_head_finishes_an_upload_whose_completion_was_cut_short(
    stack: Stack, alice: TusClient, blob_root: Path
) -> None:
    """A replica that recorded the last bytes and died before completing: the client's
    next HEAD completes it, and the upload id makes a video."""
    data = os.urandom(MIB + 17)
    path = await alice.start(len(data))
    upload_id = path.rsplit("/", 1)[1]
    app = stack.servers["stream"].app

    async def whole() -> AsyncIterator[bytes]:
        yield data

    name = f"tus-{0:015d}-0dead0"
    await app[BLOBS].write(segment_blob_key(upload_id, name), whole())
    store = TusStateStore(app[KV])
    tus = await store.load(upload_id)
    assert tus is not None
    outcome, offset = await store.append(
        upload_id,
        owner_id=tus.upload.owner_id,
        offset=0,
        length=len(data),
        segment=name,
        ttl=3600,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    assert (outcome, offset) == (AppendOutcome.APPENDED, len(data))

    head = await alice.head(path)
    assert head.status == 200
    assert head.headers["Upload-Offset"] == str(len(data))
    assert "Upload-Expires" not in head.headers  # finished: it no longer expires
    assert blob_path(blob_root, data).read_bytes() == data
    response = await stack.gateway.post(
        "/api/v1/videos", json={"title": "Late", "upload_id": upload_id}, headers=alice.auth
    )
    assert response.status == 201, await response.text()


async def test_creation_with_a_refused_body_still_says_where_the_upload_is(
    alice: TusClient, blob_root: Path
) -> None:
    data = os.urandom(MIB)
    wrong = upload_checksum("sha1", b"not these bytes")
    response = await alice.create(len(data), body=data, extra={"Upload-Checksum": wrong})
    await tus_problem(response, 460, "checksum_mismatch")
    spec = json.loads((Path(__file__).parents[2] / "gateway" / "openapi.json").read_text())
    assert "460" in spec["paths"]["/api/v1/tus/"]["post"]["responses"]  # documented too
    path = urlsplit(response.headers["Location"]).path
    assert await alice.offset(path) == 0
    assert upload_files(blob_root, path) == []
    assert (await alice.patch(path, 0, data)).status == 204
    assert blob_path(blob_root, data).read_bytes() == data
