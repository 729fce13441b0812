"""The live hub under a slow viewer: bounded queue, messages dropped for that viewer
alone, every other viewer served in full and in order (embedded and real Redis)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from api_service.live.hub import LiveHub
from shared.kv import KeyValueStore, open_kv

QUEUE = 8
MESSAGES = 60
WAIT = 10.0


@pytest.fixture(params=["embedded", pytest.param("real", marks=pytest.mark.integration)])
async def kv(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[KeyValueStore]:
    url = (
        f"memory://hub-{secrets.token_hex(4)}"
        if request.param == "embedded"
        else request.getfixturevalue("redis_server_url")
    )
    store = await open_kv(url, f"{namespace}_{secrets.token_hex(3)}")
    yield store
    await store.delete_namespace()
    await store.close()


async def test_a_stalled_viewer_never_slows_the_others(kv: KeyValueStore) -> None:
    hub = LiveHub(kv, queue_size=QUEUE)
    hub.start()
    try:
        async with asyncio.timeout(WAIT):
            await hub.listening.wait()
        stalled_forever = asyncio.Event()  # never set: this viewer's socket is stuck
        received: list[str] = []
        all_in = asyncio.Event()

        async def stuck(_text: str) -> None:
            await stalled_forever.wait()

        async def fast(text: str) -> None:
            received.append(text)
            if len(received) == MESSAGES:
                all_in.set()

        slow = hub.join("v1", stuck)
        hub.join("v1", fast)
        bystander = hub.join("v2", fast)  # another video's viewer gets nothing of v1
        for i in range(MESSAGES):
            await hub.publish("v1", f"m{i}")
        async with asyncio.timeout(WAIT):
            await all_in.wait()
        assert received == [f"m{i}" for i in range(MESSAGES)]
        # The stuck viewer holds one message in its send and QUEUE in its queue, at most.
        assert MESSAGES - QUEUE - 1 <= slow.dropped <= MESSAGES - QUEUE
        assert bystander.delivered == 0
        await hub.leave(slow)  # leaving cancels the stuck send
        assert hub.local_count("v1") == 1
    finally:
        await hub.close()


async def test_a_replica_that_loses_its_viewers_leaves_the_sum(kv: KeyValueStore) -> None:
    first = LiveHub(kv, viewer_interval=0.05)
    second = LiveHub(kv, viewer_interval=0.05)
    on_first: asyncio.Queue[str] = asyncio.Queue()
    on_second: asyncio.Queue[str] = asyncio.Queue()
    first.join("v", on_first.put)
    viewer = second.join("v", on_second.put)
    try:
        await first.report_counts()
        await second.report_counts()
        async with asyncio.timeout(WAIT):
            assert await on_first.get() == '{"type":"viewers","count":1}'
            assert await on_second.get() == '{"type":"viewers","count":2}'
        await second.leave(viewer)
        await second.report_counts()  # the second replica withdraws its count at once
        await first.report_counts()
        async with asyncio.timeout(WAIT):
            assert await on_first.get() == '{"type":"viewers","count":1}'
    finally:
        await first.close()
        await second.close()
