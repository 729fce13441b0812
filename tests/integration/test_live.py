"""The live channel end to end: two api replicas behind their own gateways, sharing Redis
and the bus (embedded and real), a viewer on one and the sender on the other; viewer
counts summed across replicas; the 4401, 4404 and 4429 closes as a browser sees them;
sockets that end with their token (signed out on any replica, or expired)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from api_service.app import create_app as create_api_app
from gateway.app import create_app as create_gateway_app
from shared.auth import TokenVerifier
from shared.kv import open_kv
from shared.settings import Settings
from tests.clients import Publisher
from tests.conftest import INTERNAL_TOKEN, JWT_PUBLIC_KEY
from tests.stack import Stack, start_stack

# The design's promise: a danmaku reaches every viewer within a second.
DELIVERY_DEADLINE = 1.0
# A sign-out (or the token's expiry) closes its sockets on every replica within this.
TOKEN_END_DEADLINE = 2.0
WAIT = 10.0


@dataclasses.dataclass
class Replicas:
    a: Stack  # gateway A -> api A
    b: Stack  # gateway B -> api B (same stream, scheduler and back ends)


async def start_replicas(settings: Settings, aiohttp_server: Any, aiohttp_client: Any) -> Replicas:
    first = await start_stack(settings, aiohttp_server, aiohttp_client)
    api_b = await aiohttp_server(create_api_app(settings))
    settings_b = dataclasses.replace(first.settings, api_url=str(api_b.make_url("")).rstrip("/"))
    gateway_b = await aiohttp_server(create_gateway_app(settings_b))
    second = Stack(
        gateway=await aiohttp_client(gateway_b),
        settings=settings_b,
        servers={**first.servers, "api": api_b, "gateway": gateway_b},
    )
    return Replicas(first, second)


FAST = {"VOD_LIVE_VIEWER_INTERVAL": "0.1", "VOD_DANMAKU_RATE": "3/3600"}


@pytest.fixture(params=["embedded", pytest.param("real", marks=pytest.mark.integration)])
async def replicas(
    request: pytest.FixtureRequest,
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Replicas]:
    env = dict(FAST)
    if request.param == "real":
        env |= request.getfixturevalue("real_backends_env")
    settings = make_settings(**env)
    yield await start_replicas(settings, aiohttp_server, aiohttp_client)
    if request.param == "real":
        kv = await open_kv(settings.redis_url, settings.namespace)
        try:
            await kv.delete_namespace()
        finally:
            await kv.close()


async def publisher(stack: Stack, prefix: str) -> Publisher:
    name = f"{prefix}_{os.urandom(3).hex()}"
    return Publisher(stack, name, await stack.new_user(name))


def token_of(who: Publisher) -> str:
    return who.auth["Authorization"].removeprefix("Bearer ")


def live(video_id: str) -> str:
    return f"/api/v1/videos/{video_id}/live"


def danmaku(offset_ms: int, content: str) -> dict[str, Any]:
    return {"offset_ms": offset_ms, "content": content, "mode": "top", "color": "#00ff00"}


async def next_of_type(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """The next message of ``kind`` (viewer counts and others may come between)."""
    while True:
        message = await ws.receive()
        assert message.type is WSMsgType.TEXT, message
        body: dict[str, Any] = message.json()
        if body["type"] == kind:
            return body


async def test_a_danmaku_sent_to_one_replica_reaches_viewers_of_the_other(
    replicas: Replicas,
) -> None:
    alice = await publisher(replicas.a, "alice")
    video = await alice.video()
    bob = await publisher(replicas.b, "bob")
    viewer = await replicas.a.gateway.ws_connect(live(video["id"]))
    sender = await replicas.b.gateway.ws_connect(
        live(video["id"]) + f"?access_token={token_of(bob)}"
    )
    async with viewer, sender:
        # Over HTTP on replica B...
        response = await replicas.b.gateway.post(
            f"/api/v1/videos/{video['id']}/danmaku", json=danmaku(5, "hello"), headers=bob.auth
        )
        assert response.status == 201
        sent = await response.json()
        async with asyncio.timeout(DELIVERY_DEADLINE):
            pushed = await next_of_type(viewer, "danmaku")
        assert pushed == {"type": "danmaku", **sent}
        # ... and over replica B's live socket; the sender sees its own too.
        await sender.send_json({"type": "danmaku", **danmaku(6, "from the socket")})
        async with asyncio.timeout(DELIVERY_DEADLINE):
            pushed = await next_of_type(viewer, "danmaku")
        assert pushed["content"] == "from the socket"
        assert pushed["author"]["username"] == bob.username
        ack = await next_of_type(sender, "sent")
        assert ack["id"] == pushed["id"]
        # Readable from either replica at once.
        for stack in (replicas.a, replicas.b):
            listed = await stack.gateway.get(f"/api/v1/videos/{video['id']}/danmaku")
            assert [i["content"] for i in (await listed.json())["items"]] == [
                "hello",
                "from the socket",
            ]


async def test_many_viewers_on_both_replicas_get_every_danmaku(replicas: Replicas) -> None:
    alice = await publisher(replicas.a, "alice")
    video = await alice.video()
    sockets = [
        await (replicas.a if i % 2 else replicas.b).gateway.ws_connect(live(video["id"]))
        for i in range(40)
    ]
    try:
        for i in range(3):
            response = await replicas.a.gateway.post(
                f"/api/v1/videos/{video['id']}/danmaku",
                json=danmaku(i, f"n{i}"),
                headers=alice.auth,
            )
            assert response.status == 201

        async def three(ws: aiohttp.ClientWebSocketResponse) -> list[str]:
            return [(await next_of_type(ws, "danmaku"))["content"] for _ in range(3)]

        async with asyncio.timeout(WAIT):
            received = await asyncio.gather(*(three(ws) for ws in sockets))
        assert received == [["n0", "n1", "n2"]] * len(sockets)
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))


async def test_viewer_counts_are_summed_across_replicas(replicas: Replicas) -> None:
    alice = await publisher(replicas.a, "alice")
    video = await alice.video()
    other = await alice.video("Another")
    on_a = [await replicas.a.gateway.ws_connect(live(video["id"])) for _ in range(2)]
    on_b = await replicas.b.gateway.ws_connect(live(video["id"]))
    elsewhere = await replicas.b.gateway.ws_connect(live(other["id"]))
    try:

        async def count_reaches(ws: aiohttp.ClientWebSocketResponse, expected: int) -> None:
            while (await next_of_type(ws, "viewers"))["count"] != expected:
                pass

        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(count_reaches(ws, 3) for ws in [*on_a, on_b]))
            await count_reaches(elsewhere, 1)
        await on_a[0].close()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(count_reaches(on_a[1], 2), count_reaches(on_b, 2))
    finally:
        await asyncio.gather(*(ws.close() for ws in [*on_a, on_b, elsewhere]))


async def test_close_codes_through_the_gateway(replicas: Replicas) -> None:
    alice = await publisher(replicas.a, "alice")
    video = await alice.video()
    gateway = replicas.a.gateway

    unknown = await gateway.ws_connect(live("01NOSUCHVIDEO000000000000"))
    assert (await unknown.receive()).type is WSMsgType.CLOSE
    assert unknown.close_code == 4404

    anonymous = await gateway.ws_connect(live(video["id"]))
    await anonymous.send_json({"type": "danmaku", **danmaku(1, "who am I")})
    assert (await next_close(anonymous)) == 4401

    # Three danmaku per hour (FAST): the fourth closes the flooder.
    flooder = await gateway.ws_connect(live(video["id"]) + f"?access_token={token_of(alice)}")
    for i in range(3):
        await flooder.send_json({"type": "danmaku", **danmaku(i, f"spam {i}")})
        await next_of_type(flooder, "sent")
    await flooder.send_json({"type": "danmaku", **danmaku(9, "one too many")})
    assert (await next_close(flooder)) == 4429

    # A bad message is answered, not fatal.
    polite = await gateway.ws_connect(live(video["id"]), headers=alice.auth)
    async with polite:
        await polite.send_str("not json")
        assert (await next_of_type(polite, "error"))["code"] == "malformed_json"
        await polite.send_json({"type": "danmaku", "offset_ms": -1, "content": ""})
        error = await next_of_type(polite, "error")
        assert error["code"] == "validation_failed"
        assert {e["field"] for e in error["errors"]} >= {"offset_ms", "content", "mode"}
        await polite.send_json({"type": "hello"})
        assert (await next_of_type(polite, "error"))["code"] == "unknown_message"


async def next_close(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    while True:
        message = await ws.receive()
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED):
            return ws.close_code


async def test_a_revoked_or_bad_token_is_refused_at_the_handshake(replicas: Replicas) -> None:
    alice = await publisher(replicas.a, "alice")
    video = await alice.video()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await replicas.a.gateway.ws_connect(
            live(video["id"]) + f"?access_token={secrets.token_hex(8)}"
        )
    assert refused.value.status == 401


async def close_frame(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """The code of the close frame the server sent (what a browser's close event shows):
    a server closing from another task than its reader's drops the connection without
    awaiting the reply, so the client's own ``close_code`` may end up 1006."""
    while True:
        message = await ws.receive()
        if message.type is WSMsgType.CLOSE:
            return int(message.data)
        if message.type is WSMsgType.CLOSED:
            return None


async def answering(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Returns once the api's handler answers a frame: the socket is past its set-up."""
    await ws.send_json({"type": "hello"})
    assert (await next_of_type(ws, "error"))["code"] == "unknown_message"


async def direct_to_api(stack: Stack, path: str, token: str) -> aiohttp.ClientWebSocketResponse:
    """A socket straight to ``stack``'s api replica, as the gateway's bridge opens it."""
    identity = TokenVerifier(JWT_PUBLIC_KEY).verify(token)
    url = str(stack.servers["api"].make_url(path))
    return await stack.gateway.session.ws_connect(
        url, headers={"X-Internal-Token": INTERNAL_TOKEN, **identity.to_headers()}
    )


async def test_signing_out_on_one_replica_closes_that_sessions_sockets_on_every_replica(
    replicas: Replicas,
) -> None:
    alice = await publisher(replicas.a, "alice")
    video = await alice.video()
    bob = await publisher(replicas.b, "bob")
    path = live(video["id"])
    through_b = await replicas.b.gateway.ws_connect(path + f"?access_token={token_of(alice)}")
    through_a = await replicas.a.gateway.ws_connect(path, headers=alice.auth)
    on_api_b = await direct_to_api(replicas.b, path, token_of(alice))
    someone_else = await replicas.b.gateway.ws_connect(path, headers=bob.auth)
    alices = [through_b, through_a, on_api_b]
    try:
        await asyncio.gather(*(answering(ws) for ws in [*alices, someone_else]))

        signed_out = await replicas.a.gateway.delete("/api/v1/sessions", headers=alice.auth)
        assert signed_out.status == 204

        async with asyncio.timeout(TOKEN_END_DEADLINE):
            closes = await asyncio.gather(*(close_frame(ws) for ws in alices))
        assert closes == [4401, 4401, 4401]
        # Only that session's sockets: another user's stays open and answered.
        await answering(someone_else)
    finally:
        await asyncio.gather(*(ws.close() for ws in [*alices, someone_else]))


async def test_a_socket_closes_when_its_token_expires(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(VOD_ACCESS_TOKEN_SECONDS="3")
    stack = await start_stack(settings, aiohttp_server, aiohttp_client)
    alice = await publisher(stack, "alice")
    video = await alice.video()
    expires_at = TokenVerifier(JWT_PUBLIC_KEY).verify(token_of(alice)).expires_at
    path = live(video["id"])
    through_gateway = await stack.gateway.ws_connect(path, headers=alice.auth)
    on_api = await direct_to_api(stack, path, token_of(alice))
    anonymous = await stack.gateway.ws_connect(path)
    try:
        await asyncio.gather(*(answering(ws) for ws in (through_gateway, on_api, anonymous)))

        async with asyncio.timeout(expires_at - time.time() + TOKEN_END_DEADLINE):
            closes = await asyncio.gather(close_frame(through_gateway), close_frame(on_api))
        assert list(closes) == [4401, 4401]
        assert time.time() >= expires_at  # at the expiry, not before
        # A viewer who never signed in has no token to lose.
        await answering(anonymous)
    finally:
        await asyncio.gather(*(ws.close() for ws in (through_gateway, on_api, anonymous)))


async def test_a_socket_opened_as_its_token_is_revoked_is_closed(replicas: Replicas) -> None:
    # The gateway checked the token before the sign-out, the api registers the socket
    # after the sign-out's message went by: opened straight on the api with the identity
    # the gateway would have forwarded, the socket still finds the revocation.
    alice = await publisher(replicas.a, "alice")
    video = await alice.video()
    signed_out = await replicas.a.gateway.delete("/api/v1/sessions", headers=alice.auth)
    assert signed_out.status == 204
    late = await direct_to_api(replicas.b, live(video["id"]), token_of(alice))
    async with late:
        async with asyncio.timeout(TOKEN_END_DEADLINE):
            assert await close_frame(late) == 4401
