"""Danmaku over HTTP through the gateway: send, window reads (Redis, then the database
behind it), validation, rate limit, hidden blocked words."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from api_service.repositories.danmaku import BUCKET_MS, bucket_key
from shared.db import Database
from shared.db.schema import danmaku
from shared.resources import DB, KV
from shared.settings import Settings
from tests.clients import Publisher
from tests.problems import problem
from tests.stack import Stack, start_stack

POLL = 0.02
PERSIST_TIMEOUT = 10.0


@pytest.fixture(params=["embedded", pytest.param("real", marks=pytest.mark.integration)])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    stack: Stack = request.getfixturevalue("stack" if request.param == "embedded" else "real_stack")
    return stack


async def publisher(stack: Stack, prefix: str = "alice") -> Publisher:
    name = f"{prefix}_{os.urandom(3).hex()}"
    return Publisher(stack, name, await stack.new_user(name))


def url(video_id: str) -> str:
    return f"/api/v1/videos/{video_id}/danmaku"


def body(offset_ms: Any, content: str = "666", **extra: Any) -> dict[str, Any]:
    return {"offset_ms": offset_ms, "content": content, "mode": "scroll", "color": "#FFaa00"} | (
        extra
    )


async def send(stack: Stack, who: Publisher, video_id: str, payload: Any) -> Any:
    return await stack.gateway.post(url(video_id), json=payload, headers=who.auth)


async def window(stack: Stack, video_id: str, query: str = "") -> list[dict[str, Any]]:
    response = await stack.gateway.get(url(video_id) + query)
    assert response.status == 200, await response.text()
    items: list[dict[str, Any]] = (await response.json())["items"]
    return items


async def persisted(db: Database, video_id: str, count: int) -> None:
    """Bounded wait for the scheduler (another app) to have written ``count`` rows."""
    async with asyncio.timeout(PERSIST_TIMEOUT):
        while True:
            async with db.connect() as conn:
                found = (
                    await conn.execute(
                        select(func.count())
                        .select_from(danmaku)
                        .where(danmaku.c.video_id == video_id)
                    )
                ).scalar_one()
            if found >= count:
                return
            await asyncio.sleep(POLL)


async def test_send_then_read_a_window_sorted_by_offset(any_stack: Stack) -> None:
    alice = await publisher(any_stack)
    video = await alice.video()
    offsets = [BUCKET_MS + 5, 10, BUCKET_MS - 1, 0, 2 * BUCKET_MS + 7]
    sent = []
    for offset in offsets:
        response = await send(any_stack, alice, video["id"], body(offset, f"at {offset}"))
        assert response.status == 201, await response.text()
        sent.append(await response.json())
    first = sent[0]
    assert first["color"] == "#ffaa00"
    assert first["author"] == {"id": first["author"]["id"], "username": alice.username}
    assert set(first) == {"id", "offset_ms", "content", "mode", "color", "author", "created_at"}
    # Readable at once: the default window is the first six minutes.
    items = await window(any_stack, video["id"])
    assert [i["offset_ms"] for i in items] == [0, 10, BUCKET_MS - 1]
    # Across buckets, inclusive bounds.
    items = await window(any_stack, video["id"], f"?from_ms=10&to_ms={2 * BUCKET_MS + 7}")
    assert [i["offset_ms"] for i in items] == [10, BUCKET_MS - 1, BUCKET_MS + 5, 2 * BUCKET_MS + 7]
    assert items[1] == sent[2]


async def test_window_falls_back_to_the_database(any_stack: Stack) -> None:
    alice = await publisher(any_stack)
    video = await alice.video()
    for offset in (5, 50, BUCKET_MS + 1):
        assert (await send(any_stack, alice, video["id"], body(offset))).status == 201
    await persisted(any_stack.servers["api"].app[DB], video["id"], 3)
    before = await window(any_stack, video["id"], f"?from_ms=0&to_ms={2 * BUCKET_MS}")
    # Redis loses the buckets (expiry, eviction, a restart): the database answers.
    kv = any_stack.servers["api"].app[KV]
    await kv.delete(bucket_key(video["id"], 0), bucket_key(video["id"], 1))
    after = await window(any_stack, video["id"], f"?from_ms=0&to_ms={2 * BUCKET_MS}")
    assert after == before
    # ... and refills Redis: a danmaku sent now joins the loaded bucket.
    assert await kv.zcard(bucket_key(video["id"], 0)) == 3  # two danmaku and the marker
    assert (await send(any_stack, alice, video["id"], body(7))).status == 201
    items = await window(any_stack, video["id"], "?from_ms=0&to_ms=100")
    assert [i["offset_ms"] for i in items] == [5, 7, 50]


async def test_validation(any_stack: Stack) -> None:
    alice = await publisher(any_stack)
    video = await alice.video()
    bad = [
        body(-1),
        body(24 * 3600 * 1000 + 1),
        body(True),
        body("5"),
        body(0, ""),
        body(0, "   "),
        body(0, "x" * 101),
        body(0, mode="sideways"),
        body(0, mode={"not": "hashable"}),  # found by the fuzzer: was a 500
        body(0, mode=["scroll"]),
        body(0, color="red"),
        body(0, color="#12345"),
        body(0, extra="no"),
        {"content": "no offset", "mode": "top", "color": "#000000"},
        [],
    ]
    for payload in bad:
        await problem(await send(any_stack, alice, video["id"], payload), 400, "validation_failed")
    assert (await send(any_stack, alice, video["id"], body(0, "x" * 100, mode="top"))).status == 201
    anonymous = await any_stack.gateway.post(url(video["id"]), json=body(0))
    await problem(anonymous, 401, "unauthorized")
    unknown = "01NOSUCHVIDEO000000000000"
    await problem(await send(any_stack, alice, unknown, body(0)), 404, "video_not_found")
    await problem(await any_stack.gateway.get(url(unknown)), 404, "video_not_found")
    for query in (
        "?from_ms=-1",
        "?from_ms=x",
        "?to_ms=1e3",
        "?from_ms=100&to_ms=99",
        f"?from_ms=0&to_ms={3600 * 1000}",
    ):
        response = await any_stack.gateway.get(url(video["id"]) + query)
        await problem(response, 400, "validation_failed")


@pytest.fixture
async def strict_stack(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> Stack:
    settings = make_settings(VOD_DANMAKU_RATE="3/3600", VOD_BLOCKED_WORDS="spam")
    return await start_stack(settings, aiohttp_server, aiohttp_client)


async def test_rate_limit_and_hidden_blocked_words(strict_stack: Stack) -> None:
    alice = await publisher(strict_stack)
    bob = await publisher(strict_stack, "bob")
    video = await alice.video()
    # A blocked word: the sender sees a normal 201, nobody sees the danmaku...
    hidden = await send(strict_stack, alice, video["id"], body(1, "buy SPAM here"))
    assert hidden.status == 201
    assert (await send(strict_stack, alice, video["id"], body(2, "fine"))).status == 201
    assert [i["content"] for i in await window(strict_stack, video["id"])] == ["fine"]
    # ... but the database keeps it, marked hidden, and it stays hidden from there too.
    db = strict_stack.servers["api"].app[DB]
    await persisted(db, video["id"], 2)
    async with db.connect() as conn:
        rows = (await conn.execute(select(danmaku.c.content, danmaku.c.hidden))).all()
    assert sorted(rows) == [("buy SPAM here", True), ("fine", False)]
    await strict_stack.servers["api"].app[KV].delete(bucket_key(video["id"], 0))
    assert [i["content"] for i in await window(strict_stack, video["id"])] == ["fine"]
    # Three per hour per user: the hidden one counted too.
    assert (await send(strict_stack, alice, video["id"], body(3))).status == 201
    limited = await send(strict_stack, alice, video["id"], body(4))
    await problem(limited, 429, "danmaku_rate_limited")
    assert int(limited.headers["Retry-After"]) > 0
    assert (await send(strict_stack, bob, video["id"], body(5))).status == 201
