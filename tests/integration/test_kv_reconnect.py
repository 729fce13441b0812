"""The key-value store after its Redis server went away: no request fails on a dead connection.

A private ``redis-server`` (``tests/private_servers.py``) is restarted, or has its client
connections killed, under a store whose pool holds connections to it. The shared Redis on
6379 is never touched.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from shared.cache import CacheInvalidations, ReadThroughCache, entry_key
from shared.kv import KeyValueStore, KeyValueUnavailableError, open_kv
from tests.private_servers import RedisServer

pytestmark = pytest.mark.integration

# Enough concurrent commands that the pool holds this many connections, as a busy
# service's does: after a restart every one of them is dead.
CONCURRENCY = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("kv-reconnect"), appendonly=True) as server:
        yield server


@pytest.fixture
async def kv(server: RedisServer) -> AsyncIterator[KeyValueStore]:
    if not server.running:  # a test that failed half-way may have left it stopped
        await asyncio.to_thread(server.start)
    store = await open_kv(server.url, f"reconnect_{secrets.token_hex(4)}")
    yield store
    await store.close()


async def fill_pool(kv: KeyValueStore) -> None:
    await asyncio.gather(*(kv.set(f"key{i}", str(i)) for i in range(CONCURRENCY)))


def kill_clients(server: RedisServer) -> None:
    """Has the server close every client connection but this one, as a restart would.

    Blocking on purpose: the event loop does not run until the store's next command, so
    the store has not yet seen its connections close, the race a plain pool check loses.
    """
    with redis.Redis(host="127.0.0.1", port=server.port) as admin:
        admin.client_kill_filter(_type="normal", skipme=True)


async def test_every_command_succeeds_after_a_restart(
    kv: KeyValueStore, server: RedisServer
) -> None:
    await fill_pool(kv)
    await asyncio.to_thread(server.stop)
    with pytest.raises(KeyValueUnavailableError):
        await kv.get("key0")

    await asyncio.to_thread(server.start)
    await kv.ping()
    # Counters run a script and are never repeated on failure, so these succeed only
    # if no command is sent on a connection the restart closed.
    counts = await asyncio.gather(*(kv.incr(f"hits{i}") for i in range(CONCURRENCY)))
    values = await asyncio.gather(*(kv.get(f"key{i}") for i in range(CONCURRENCY)))
    created = await asyncio.gather(*(kv.set(f"new{i}", "v", nx=True) for i in range(CONCURRENCY)))

    assert counts == [1] * CONCURRENCY
    # The append-only file kept the keys written before the restart.
    assert values == [str(i) for i in range(CONCURRENCY)]
    assert created == [True] * CONCURRENCY


async def test_reads_succeed_when_the_server_just_closed_their_connection(
    kv: KeyValueStore, server: RedisServer
) -> None:
    await fill_pool(kv)
    # One command at a time, each straight after the kill: the store learns that its
    # connection is dead only when the command's answer does not come.
    kill_clients(server)
    assert await kv.get("key0") == "0"
    kill_clients(server)
    await kv.ping()
    kill_clients(server)
    assert await kv.set("after", "v")
    kill_clients(server)
    assert await kv.hgetall("missing") == {}
    kill_clients(server)
    assert await kv.exists("after")


async def test_local_cache_copies_survive_no_lost_connection(
    kv: KeyValueStore, server: RedisServer
) -> None:
    """Invalidations sent while a process's subscription was down are lost to it: when
    it resubscribes it must have dropped every local copy, not keep answering with one."""
    invalidations = CacheInvalidations(kv, resubscribe_seconds=0.05)
    cache: ReadThroughCache[str] = ReadThroughCache(
        kv,
        prefix="video",
        encode=str,
        decode=str,
        invalidations=invalidations,
        keep_local_copies=True,
    )

    async def load_old() -> str:
        return "old"

    async with invalidations.running():
        await invalidations.wait_subscribed()
        assert await cache.get("v1", load_old) == "old"
        subscribed_as = invalidations.generation
        with redis.Redis(host="127.0.0.1", port=server.port) as admin:
            admin.client_kill_filter(_type="pubsub")
        # Meanwhile the entry changed, and its invalidation reached nobody.
        await kv.set(entry_key("video", "v1"), "new", ex=300)
        for _ in range(500):  # until the subscriber has seen its connection go
            if invalidations.generation != subscribed_as:
                break
            await asyncio.sleep(0.01)  # the store's task notices on its own
        else:
            raise AssertionError("the subscriber never noticed its connection was closed")
        await invalidations.wait_subscribed()
        assert await cache.get("v1", load_old) == "new"


async def test_a_subscription_to_a_server_gone_silent_ends(server: RedisServer) -> None:
    """No reset, no answer (a partition): the subscriber must find out by itself, or live
    viewers would miss danmaku and cached copies outlive their invalidations until TCP
    gives up, many minutes later."""
    kv = await open_kv(server.url, f"silent_{secrets.token_hex(4)}", subscription_heartbeat=0.2)
    try:
        async with kv.subscribe("ch") as messages:
            with server.frozen():
                async with asyncio.timeout(10):
                    with pytest.raises(KeyValueUnavailableError):
                        await anext(messages)
    finally:
        await kv.close()
