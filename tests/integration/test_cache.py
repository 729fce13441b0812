"""The read-through cache on both key-value adapters: avalanche, penetration, breakdown."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from shared.cache import ReadThroughCache
from shared.kv import KeyValueStore
from tests.integration.conftest import OpenStore

pytestmark = pytest.mark.integration


class CountingLoader:
    """A database stand-in: counts loads, and can hold them until released."""

    def __init__(self, rows: dict[str, dict[str, str]]) -> None:
        self.rows = rows
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, key: str) -> dict[str, str] | None:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        return self.rows.get(key)


def make_cache(kv: KeyValueStore, **options: float) -> ReadThroughCache[dict[str, str]]:
    return ReadThroughCache(
        kv,
        prefix="video",
        encode=lambda value: orjson.dumps(value).decode(),
        decode=orjson.loads,
        rng=random.Random(7),
        **options,
    )


async def test_hit_after_first_load(kv: KeyValueStore) -> None:
    cache = make_cache(kv)
    loader = CountingLoader({"v1": {"title": "Cats"}})
    assert await cache.get("v1", lambda: loader("v1")) == {"title": "Cats"}
    assert await cache.get("v1", lambda: loader("v1")) == {"title": "Cats"}
    assert loader.calls == 1


async def test_expiries_are_spread_by_jitter(kv: KeyValueStore) -> None:
    """No avalanche: entries cached together do not all expire in the same second."""
    cache = make_cache(kv, ttl=300, jitter=120)
    loader = CountingLoader({f"v{i}": {"n": str(i)} for i in range(20)})
    for i in range(20):
        await cache.get(f"v{i}", lambda i=i: loader(f"v{i}"))  # type: ignore[misc]
    ttls = [await kv.ttl(f"cache:video:v{i}") for i in range(20)]
    assert all(299 <= ttl <= 420 for ttl in ttls)
    assert len(set(ttls)) > 10


async def test_missing_ids_are_cached_negatively_until_invalidated(kv: KeyValueStore) -> None:
    """No penetration: asking again for an id that does not exist stays off the database."""
    cache = make_cache(kv, negative_ttl=30)
    loader = CountingLoader({})
    for _ in range(5):
        assert await cache.get("ghost", lambda: loader("ghost")) is None
    assert loader.calls == 1
    assert 0 < await kv.ttl("cache:video:ghost") <= 30
    # Created later: the writer invalidates, and the next read sees it.
    loader.rows["ghost"] = {"title": "Now I exist"}
    await cache.invalidate("ghost")
    assert await cache.get("ghost", lambda: loader("ghost")) == {"title": "Now I exist"}
    assert loader.calls == 2


async def test_concurrent_misses_in_one_process_load_once(kv: KeyValueStore) -> None:
    """No breakdown: a hot key rebuilt while 50 readers wait costs one load."""
    cache = make_cache(kv)
    loader = CountingLoader({"hot": {"title": "Trending"}})
    loader.release.clear()
    readers = [asyncio.create_task(cache.get("hot", lambda: loader("hot"))) for _ in range(50)]
    await loader.started.wait()
    loader.release.set()
    results = await asyncio.gather(*readers)
    assert results == [{"title": "Trending"}] * 50
    assert loader.calls == 1


async def test_concurrent_misses_across_replicas_load_once(open_store: OpenStore) -> None:
    """Two replicas (two caches on one Redis) rebuilding the same key: one load."""
    first = make_cache(await open_store("shared"), poll_interval=0.005)
    second = make_cache(await open_store("shared"), poll_interval=0.005)
    loader = CountingLoader({"hot": {"title": "Trending"}})
    loader.release.clear()
    a = asyncio.create_task(first.get("hot", lambda: loader("hot")))
    await loader.started.wait()
    # The second replica finds the lock taken and waits for the entry...
    b = asyncio.create_task(second.get("hot", lambda: loader("hot")))
    loader.release.set()
    assert await a == await b == {"title": "Trending"}
    assert loader.calls == 1


async def test_a_failing_load_is_not_cached_and_reaches_every_waiter(kv: KeyValueStore) -> None:
    cache = make_cache(kv)
    calls = 0

    async def broken() -> dict[str, str] | None:
        nonlocal calls
        calls += 1
        raise ConnectionError("database down")

    results = await asyncio.gather(
        *(cache.get("v9", broken) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(result, ConnectionError) for result in results)
    assert calls == 1
    assert await kv.get("cache:video:v9") is None
    assert await kv.get("cache:video:v9:lock") is None
