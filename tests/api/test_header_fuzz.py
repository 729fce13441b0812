"""Every request header vod parses, with arbitrary values: never a 5xx (issue 19, point 9).

Property tests (hypothesis) against the whole stack in the test's event loop, through the
gateway as a client would send them, and straight to the stream service for the headers
the gateway derives from what a client sent (``Host`` becomes ``X-Forwarded-Host``).
Values are printable latin-1 without CR/LF (what an HTTP/1.1 field value can carry and
aiohttp's client will send), mixed with fragments of each header's own grammar so that
examples get past the first check of each parser. The stack is built once per test and
shared by its examples: what one example leaves behind (an upload, a session) is just
more state for the next to meet.
"""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.clients import Publisher, Uploader
from tests.conftest import INTERNAL_TOKEN
from tests.stack import Stack

# Bounded: each test takes seconds, not minutes, on this shared machine.
EXAMPLES = 60
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # One stack for all examples of a test, on purpose (see the module docstring).
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Printable latin-1 and tab: no CR, LF or other control characters.
_LATIN1 = st.characters(
    codec="latin-1", categories=("L", "M", "N", "P", "S", "Zs"), include_characters="\t"
)
_FRAGMENTS = st.sampled_from(
    [
        "bytes=", "bytes", "=", "-", ",", " ", "0", "1", "9" * 25, "\u0663", "\u00b2",
        '"', "W/", "*", "GMT", "-0000", "+9999", "Mon, 01 Jan 2024 00:00:00", "Sun Nov  6",
        "Bearer ", "bearer", "Basic ", "eyJ", ".", "sha1 ", "sha256 ", "md5 ", "AAAA", "==",
        "1.0.0", "filename ", "filetype ", "1", "application/offset+octet-stream", ";",
        "[::1]", ":8000", "localhost", "http", "https", "é", "\xff",
    ]
)  # fmt: skip
VALUES = st.one_of(
    st.text(_LATIN1, max_size=80),
    st.lists(st.one_of(_FRAGMENTS, st.text(_LATIN1, max_size=4)), max_size=8).map("".join),
)


def some_of(*names: str) -> st.SearchStrategy[dict[str, str]]:
    """Any subset of ``names``, each with a fuzzed value."""
    return st.fixed_dictionaries({}, optional=dict.fromkeys(names, VALUES))


async def assert_no_server_error(response: Any, sent: dict[str, str]) -> None:
    body = await response.read()  # to the end: a film's bytes, or a problem document
    assert response.status < 500, (response.status, sent, body[:300])


@pytest.fixture
async def published(stack: Stack) -> dict[str, Any]:
    auth = await stack.new_user()
    return await Publisher(stack, "fuzzed", auth).video()


@FUZZ
@example(method="GET", sent={"If-Modified-Since": "Mon, 01 Jan 2024 00:00:00"})
@example(method="GET", sent={"If-Modified-Since": "Mon, 01 Jan 2024 00:00:00 -0000"})
@given(method=st.sampled_from(["GET", "HEAD"]), sent=some_of(
    "Range", "If-Range", "If-None-Match", "If-Modified-Since", "Authorization", "Origin",
    "X-Request-ID", "Accept-Encoding", "Connection",
))  # fmt: skip
async def test_stream_headers(
    stack: Stack, published: dict[str, Any], method: str, sent: dict[str, str]
) -> None:
    response = await stack.gateway.request(method, published["stream_url"], headers=sent)
    await assert_no_server_error(response, sent)


@FUZZ
@given(sent=some_of("Authorization", "X-Request-ID", "Origin", "Cookie"))
async def test_authorization_headers(stack: Stack, sent: dict[str, str]) -> None:
    for method, path in (("GET", "/api/v1/users/me"), ("GET", "/api/v1/videos")):
        response = await stack.gateway.request(method, path, headers=sent)
        await assert_no_server_error(response, sent)


@pytest.fixture
async def uploader(stack: Stack) -> tuple[Uploader, str]:
    uploader = Uploader(stack, await stack.new_user())
    upload = await uploader.start(os.urandom(1000))
    return uploader, upload["upload_id"]


@FUZZ
@given(sent=some_of("X-Chunk-SHA256", "Content-Type", "Authorization"))
async def test_chunk_headers(
    stack: Stack, uploader: tuple[Uploader, str], sent: dict[str, str]
) -> None:
    client, upload_id = uploader
    response = await stack.gateway.put(
        f"/api/v1/uploads/{upload_id}/chunks/0",
        data=io.BytesIO(os.urandom(1000)),
        headers={**client.auth, **sent},
    )
    await assert_no_server_error(response, sent)


TUS_HEADERS = (
    "Tus-Resumable", "Upload-Length", "Upload-Defer-Length", "Upload-Metadata",
    "Upload-Checksum", "Upload-Offset", "Upload-Concat", "Content-Type", "Host",
)  # fmt: skip


@FUZZ
@given(with_body=st.booleans(), sent=some_of(*TUS_HEADERS))
# Found by this test: base64 of a value past ASCII raised ValueError, a 500.
@example(with_body=False, sent={"Upload-Metadata": "filename \u00a1"})
@example(with_body=True, sent={"Upload-Checksum": "sha1 \u00e9\u00e9\u00e9\u00e9"})
async def test_tus_creation_headers(
    stack: Stack, uploader: tuple[Uploader, str], with_body: bool, sent: dict[str, str]
) -> None:
    client, _upload_id = uploader
    headers = {"Tus-Resumable": "1.0.0", "Upload-Length": "1000", **client.auth, **sent}
    response = await stack.gateway.post(
        "/api/v1/tus/", data=io.BytesIO(b"x" * 10) if with_body else None, headers=headers
    )
    await assert_no_server_error(response, sent)


@pytest.fixture
async def tus_path(stack: Stack, uploader: tuple[Uploader, str]) -> str:
    client, _upload_id = uploader
    created = await stack.gateway.post(
        "/api/v1/tus/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "1000", **client.auth}
    )
    assert created.status == 201, await created.text()
    return "/api/v1/tus/" + created.headers["Location"].rstrip("/").rsplit("/", 1)[-1]


@FUZZ
@given(method=st.sampled_from(["PATCH", "HEAD", "DELETE", "OPTIONS"]), sent=some_of(*TUS_HEADERS))
async def test_tus_upload_headers(
    stack: Stack,
    uploader: tuple[Uploader, str],
    tus_path: str,
    method: str,
    sent: dict[str, str],
) -> None:
    client, _upload_id = uploader
    headers = {"Tus-Resumable": "1.0.0", **client.auth, **sent}
    body = io.BytesIO(b"x" * 10) if method == "PATCH" else None
    response = await stack.gateway.request(method, tus_path, data=body, headers=headers)
    await assert_no_server_error(response, sent)


@FUZZ
@given(sent=some_of("X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Range"))
async def test_headers_the_gateway_derives_reach_the_stream_service_safely(
    stack: Stack, published: dict[str, Any], sent: dict[str, str]
) -> None:
    """The gateway copies the client's ``Host`` into ``X-Forwarded-Host`` and its address
    into ``X-Forwarded-For``: the stream service must survive any value of either."""
    stream = stack.servers["stream"]
    headers = {"X-Internal-Token": INTERNAL_TOKEN, **sent}
    async with stack.gateway.session.get(
        stream.make_url(published["stream_url"]), headers=headers
    ) as response:
        await assert_no_server_error(response, sent)
