"""The key-value contract: the embedded (fakeredis) and the real (Redis) adapter agree.

Every test that takes ``kv`` or ``open_store`` runs once per adapter. Each test gets a
namespace of its own under the run's, removed afterwards, so tests never see each other's
keys on the shared Redis server. Expiry is checked through TTL values, never by sleeping.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from typing import Any

import pytest
import redis.asyncio.client

from shared.errors import ConfigError, ServiceUnavailableError
from shared.kv import (
    POOL_CONNECTIONS,
    TTL_MISSING,
    TTL_PERSISTENT,
    KeyValueError,
    KeyValueStore,
    KeyValueUnavailableError,
    open_kv,
)
from tests.integration.conftest import OpenStore

pytestmark = pytest.mark.integration


# How long a message may take to arrive before the test fails (never a sleep).
DELIVERY_TIMEOUT = 5.0


def closed_port() -> int:
    """A local port that nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_burst_past_the_pool_waits_for_connections(kv: KeyValueStore) -> None:
    """Three times as many commands in flight as the pool has connections (a burst of
    danmaku at a busy api): they queue for a connection, none fails."""
    burst = 3 * POOL_CONNECTIONS
    counts = await asyncio.gather(*(kv.incr("burst") for _ in range(burst)))
    assert sorted(counts) == list(range(1, burst + 1))


async def test_set_get_delete(kv: KeyValueStore) -> None:
    assert await kv.get("missing") is None
    assert await kv.set("greeting", "héllo")
    assert await kv.set("raw", b"bytes in")
    assert await kv.set("number", 42)
    assert await kv.get("greeting") == "héllo"
    assert await kv.get("raw") == "bytes in"
    assert await kv.get("number") == "42"
    assert await kv.exists("greeting")
    assert await kv.delete("greeting", "raw", "missing") == 2
    assert not await kv.exists("greeting")
    assert await kv.delete() == 0


async def test_set_with_expiry_reports_ttl(kv: KeyValueStore) -> None:
    await kv.set("short", "v", ex=30)
    await kv.set("fractional", "v", ex=1.5)
    await kv.set("forever", "v")
    assert 29 <= await kv.ttl("short") <= 30
    assert 1000 < await kv.pttl("fractional") <= 1500
    assert await kv.ttl("forever") == TTL_PERSISTENT
    assert await kv.pttl("forever") == TTL_PERSISTENT
    assert await kv.ttl("missing") == TTL_MISSING
    assert await kv.pttl("missing") == TTL_MISSING


async def test_expire_changes_ttl_and_zero_deletes(kv: KeyValueStore) -> None:
    await kv.set("k", "v", ex=30)
    assert await kv.expire("k", 600)
    assert 599 <= await kv.ttl("k") <= 600
    assert await kv.expire("k", 0.25)
    assert 0 < await kv.pttl("k") <= 250
    assert await kv.expire("k", 0)
    assert await kv.get("k") is None
    assert await kv.ttl("k") == TTL_MISSING
    assert not await kv.expire("missing", 10)


async def test_set_refuses_a_non_positive_expiry(kv: KeyValueStore) -> None:
    with pytest.raises(ValueError, match="positive"):
        await kv.set("k", "v", ex=0)


async def test_set_nx_only_creates(kv: KeyValueStore) -> None:
    assert await kv.set("lock", "first", nx=True, ex=60)
    assert not await kv.set("lock", "second", nx=True)
    assert await kv.get("lock") == "first"
    assert await kv.set("lock", "third")
    assert await kv.get("lock") == "third"


async def test_incr_sets_the_ttl_only_when_it_creates_the_key(kv: KeyValueStore) -> None:
    assert await kv.incr("window", ex=60) == 1
    assert 59 <= await kv.ttl("window") <= 60
    # Push the expiry out of the ex range: a second incr that reset it would pull it back.
    await kv.expire("window", 600)
    assert await kv.incr("window", ex=60) == 2
    assert await kv.incr("window", 5, ex=60) == 7
    assert await kv.ttl("window") > 60
    assert await kv.incr("plain") == 1
    assert await kv.ttl("plain") == TTL_PERSISTENT


async def test_incr_is_atomic_under_concurrency(kv: KeyValueStore) -> None:
    results = await asyncio.gather(*(kv.incr("counter", ex=60) for _ in range(50)))
    assert sorted(results) == list(range(1, 51))


async def test_sets(kv: KeyValueStore) -> None:
    assert await kv.sadd("s", "a", "b", "c") == 3
    assert await kv.sadd("s", "a", "d") == 1
    assert await kv.smembers("s") == {"a", "b", "c", "d"}
    assert await kv.scard("s") == 4
    assert await kv.sismember("s", "b")
    assert not await kv.sismember("s", "z")
    assert await kv.srem("s", "a", "z") == 1
    assert await kv.smembers("missing") == set()
    assert await kv.scard("missing") == 0


async def test_hashes(kv: KeyValueStore) -> None:
    assert await kv.hset("h", {"state": "uploading", "size": 10}) == 2
    assert await kv.hset("h", {"state": "complete", "owner": "u1"}) == 1
    assert await kv.hget("h", "state") == "complete"
    assert await kv.hget("h", "missing") is None
    assert await kv.hgetall("h") == {"state": "complete", "size": "10", "owner": "u1"}
    assert await kv.hdel("h", "owner", "missing") == 1
    assert await kv.hgetall("missing") == {}


async def test_sorted_sets(kv: KeyValueStore) -> None:
    assert await kv.zadd("z", {"c": 3000, "a": 1000, "b": 2000, "d": 4000}) == 4
    assert await kv.zadd("z", {"a": 500}) == 0
    assert await kv.zcard("z") == 4
    assert await kv.zrangebyscore("z", "-inf", "+inf") == ["a", "b", "c", "d"]
    assert await kv.zrangebyscore("z", 1000, 3000) == ["b", "c"]
    assert await kv.zrangebyscore("z", "(2000", 4000) == ["c", "d"]
    assert await kv.zrangebyscore("z", 0, 5000, limit=2) == ["a", "b"]
    assert await kv.zrangebyscore("z", 0, 5000, offset=1, limit=2) == ["b", "c"]
    assert await kv.zrangebyscore("z", 0, 5000, offset=3) == ["d"]
    assert await kv.zrem("z", "a", "missing") == 1
    assert await kv.zrangebyscore("z", "-inf", "+inf") == ["b", "c", "d"]


async def test_wrong_type_is_a_key_value_error(kv: KeyValueStore) -> None:
    await kv.set("text", "v")
    with pytest.raises(KeyValueError, match="WRONGTYPE") as caught:
        await kv.sadd("text", "member")
    assert not isinstance(caught.value, KeyValueUnavailableError)


async def test_namespaces_do_not_see_each_other(open_store: OpenStore) -> None:
    one = await open_store("one")
    two = await open_store("two")
    await one.set("shared-name", "one's")
    await two.set("shared-name", "two's")
    await one.sadd("members", "x")
    assert await one.get("shared-name") == "one's"
    assert await two.get("shared-name") == "two's"
    assert await two.smembers("members") == set()
    assert await one.delete_namespace() == 2
    assert await one.get("shared-name") is None
    assert await two.get("shared-name") == "two's"


async def test_keys_live_under_namespace_colon(open_store: OpenStore) -> None:
    outer = await open_store("outer")
    inner = await open_store("outer:inner")
    await inner.set("k", "v")
    assert await outer.get("inner:k") == "v"


async def test_lua_script_compare_and_set_is_atomic(open_store: OpenStore) -> None:
    kv = await open_store("main")
    other = await open_store("other")
    compare_and_set = kv.script(
        """
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            redis.call('SET', KEYS[1], ARGV[2])
            return 1
        end
        return 0
        """
    )
    await kv.set("version", "0")
    await other.set("version", "0")
    outcomes = await asyncio.gather(
        *(compare_and_set(keys=["version"], args=["0", f"writer-{i}"]) for i in range(20))
    )
    assert sorted(outcomes) == [0] * 19 + [1]
    winner = outcomes.index(1)
    assert await kv.get("version") == f"writer-{winner}"
    # KEYS were namespaced: the same name in another namespace was not touched.
    assert await other.get("version") == "0"


async def test_lua_error_is_a_key_value_error(kv: KeyValueStore) -> None:
    broken = kv.script("return redis.call('NO_SUCH_COMMAND')")
    with pytest.raises(KeyValueError):
        await broken()


async def test_pubsub_delivers_a_message_published_after_subscribe(
    open_store: OpenStore,
) -> None:
    kv = await open_store("main")
    other = await open_store("other")
    async with kv.subscribe("danmaku:v1") as messages:
        # Channels are namespaced: the same name elsewhere reaches nobody here.
        assert await other.publish("danmaku:v1", "not for you") == 0
        assert await kv.publish("danmaku:v1", "first") == 1
        assert await kv.publish("danmaku:v1", b"second") == 1
        first = await asyncio.wait_for(anext(messages), DELIVERY_TIMEOUT)
        second = await asyncio.wait_for(anext(messages), DELIVERY_TIMEOUT)
    assert (first, second) == ("first", "second")
    assert await kv.publish("danmaku:v1", "after") == 0


async def test_an_idle_subscription_sends_heartbeats_and_stays_up(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = await open_store("main", subscription_heartbeat=0.05)
    ping = redis.asyncio.client.PubSub.ping
    pings = 0
    three_pings = asyncio.Event()

    async def counted_ping(self: redis.asyncio.client.PubSub, *args: Any) -> Any:
        nonlocal pings
        pings += 1
        if pings == 3:
            three_pings.set()
        return await ping(self, *args)

    monkeypatch.setattr(redis.asyncio.client.PubSub, "ping", counted_ping)
    async with kv.subscribe("idle") as messages:
        receiving = asyncio.ensure_future(anext(messages))
        await asyncio.wait_for(three_pings.wait(), DELIVERY_TIMEOUT)
        # Each heartbeat was answered: no error ended the subscription.
        assert not receiving.done()
        assert await kv.publish("idle", "still here") == 1
        assert await asyncio.wait_for(receiving, DELIVERY_TIMEOUT) == "still here"


async def test_memory_stores_share_by_name(run_id: str) -> None:
    name = f"{run_id}-{secrets.token_hex(4)}"
    first = await open_kv(f"memory://{name}", "ns")
    second = await open_kv(f"memory://{name}", "ns")
    elsewhere = await open_kv(f"memory://{name}-other", "ns")
    try:
        await first.set("k", "v")
        assert await second.get("k") == "v"
        assert await elsewhere.get("k") is None
        async with second.subscribe("ch") as messages:
            assert await first.publish("ch", "across stores") == 1
            assert await asyncio.wait_for(anext(messages), DELIVERY_TIMEOUT) == "across stores"
    finally:
        for store in (first, second, elsewhere):
            await store.delete_namespace()
            await store.close()


async def test_bare_memory_url_is_the_default_store() -> None:
    namespace = f"default_{secrets.token_hex(4)}"
    bare = await open_kv("memory://", namespace)
    named = await open_kv("memory://default", namespace)
    try:
        await bare.set("k", "v")
        assert await named.get("k") == "v"
    finally:
        await bare.delete_namespace()
        await bare.close()
        await named.close()


async def test_unreachable_server_raises_unavailable_quickly() -> None:
    kv = await open_kv(f"redis://127.0.0.1:{closed_port()}/0", "ns")
    started = time.monotonic()
    try:
        with pytest.raises(KeyValueUnavailableError) as caught:
            await kv.ping()
        with pytest.raises(KeyValueUnavailableError):
            await kv.get("k")
    finally:
        await kv.close()
    assert time.monotonic() - started < 3
    # Reaching a client unhandled, it is a 503 with Retry-After, not a 500.
    assert isinstance(caught.value, ServiceUnavailableError)
    assert caught.value.headers["Retry-After"] == "2"


@pytest.mark.parametrize("url", ["mysql://x", "memory://name/path", "nonsense"])
async def test_unsupported_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="VOD_REDIS_URL"):
        await open_kv(url, "ns")
