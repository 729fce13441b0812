"""The read-through cache on both key-value adapters: avalanche, penetration, breakdown,
and the local copies kept in a process while its invalidations are subscribed."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from shared.cache import CacheInvalidations, ReadThroughCache, entry_key, forget_cached
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


def make_cache(kv: KeyValueStore, **options: Any) -> ReadThroughCache[dict[str, str]]:
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


# -- local copies ------------------------------------------------------------------------


async def until(condition: Callable[[], bool], what: str) -> None:
    """Waits (bounded) for a pub/sub message to have been handled."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)  # a message from Redis: nothing here to await on
    raise AssertionError(f"not within 5 s: {what}")


@contextlib.asynccontextmanager
async def replica(kv: KeyValueStore) -> AsyncIterator[tuple[ReadThroughCache[Any], Any]]:
    """One process's cache with local copies, subscribed to its invalidations."""
    invalidations = CacheInvalidations(kv)
    cache = make_cache(kv, invalidations=invalidations, keep_local_copies=True)
    async with invalidations.running():
        await invalidations.wait_subscribed()
        yield cache, invalidations


async def overwrite_in_redis(kv: KeyValueStore, key: str, value: dict[str, str]) -> None:
    """Changes the shared entry behind the cache's back (no invalidation published)."""
    await kv.set(entry_key("video", key), orjson.dumps(value).decode(), ex=300)


async def test_a_local_copy_answers_without_asking_redis(kv: KeyValueStore) -> None:
    loader = CountingLoader({"v1": {"title": "Cats"}})
    async with replica(kv) as (cache, _):
        assert await cache.get("v1", lambda: loader("v1")) == {"title": "Cats"}
        await overwrite_in_redis(kv, "v1", {"title": "changed behind its back"})
        assert await cache.get("v1", lambda: loader("v1")) == {"title": "Cats"}
    assert loader.calls == 1


async def test_an_invalidation_anywhere_drops_every_replicas_copy(
    open_store: OpenStore,
) -> None:
    """An edit or deletion made through one replica shows on the others."""
    loader = CountingLoader({"v1": {"title": "Cats"}})
    async with (
        replica(await open_store("shared")) as (first, first_invalidations),
        replica(await open_store("shared")) as (second, _),
    ):
        assert await first.get("v1", lambda: loader("v1")) == {"title": "Cats"}
        assert await second.get("v1", lambda: loader("v1")) == {"title": "Cats"}
        loader.rows["v1"] = {"title": "Dogs"}
        seen = first_invalidations.generation
        await second.invalidate("v1")
        assert await second.get("v1", lambda: loader("v1")) == {"title": "Dogs"}
        await until(lambda: first_invalidations.generation != seen, "invalidation received")
        assert await first.get("v1", lambda: loader("v1")) == {"title": "Dogs"}


async def test_forget_cached_reaches_local_copies(open_store: OpenStore) -> None:
    """The scheduler's path: no cache object, just the prefix and the ids."""
    loader = CountingLoader({"v1": {"title": "Cats"}, "v2": {"title": "Owls"}})
    scheduler = await open_store("shared")
    async with replica(await open_store("shared")) as (cache, invalidations):
        for key in ("v1", "v2"):
            await cache.get(key, lambda key=key: loader(key))  # type: ignore[misc]
        loader.rows = {"v1": {"title": "gone"}, "v2": {"title": "gone too"}}
        seen = invalidations.generation
        await forget_cached(scheduler, "video", ["v1", "v2"])
        await until(lambda: invalidations.generation >= seen + 2, "both invalidations received")
        assert await cache.get("v1", lambda: loader("v1")) == {"title": "gone"}
        assert await cache.get("v2", lambda: loader("v2")) == {"title": "gone too"}


async def test_a_read_racing_an_invalidation_keeps_no_copy(open_store: OpenStore) -> None:
    """A value loaded before an invalidation arrived may be the one it invalidated."""
    loader = CountingLoader({"v1": {"title": "old"}})
    loader.release.clear()
    writer = await open_store("shared")
    async with replica(await open_store("shared")) as (cache, invalidations):
        reading = asyncio.create_task(cache.get("v1", lambda: loader("v1")))
        await loader.started.wait()
        seen = invalidations.generation
        await forget_cached(writer, "video", ["v1"])
        await until(lambda: invalidations.generation != seen, "invalidation received")
        loader.release.set()
        assert await reading == {"title": "old"}
        await overwrite_in_redis(writer, "v1", {"title": "new"})
        assert await cache.get("v1", lambda: loader("v1")) == {"title": "new"}


async def test_no_local_copy_is_used_while_unsubscribed(kv: KeyValueStore) -> None:
    loader = CountingLoader({"v1": {"title": "Cats"}})
    invalidations = CacheInvalidations(kv)
    cache = make_cache(kv, invalidations=invalidations, keep_local_copies=True)
    async with invalidations.running():
        await invalidations.wait_subscribed()
        assert await cache.get("v1", lambda: loader("v1")) == {"title": "Cats"}
    # Unsubscribed: an invalidation could be missed, so Redis is asked every time.
    await overwrite_in_redis(kv, "v1", {"title": "Dogs"})
    assert await cache.get("v1", lambda: loader("v1")) == {"title": "Dogs"}


async def test_what_does_not_exist_is_not_copied(kv: KeyValueStore) -> None:
    """A video published a moment ago is visible as soon as Redis knows it."""
    loader = CountingLoader({})
    async with replica(kv) as (cache, _):
        assert await cache.get("v1", lambda: loader("v1")) is None
        await overwrite_in_redis(kv, "v1", {"title": "Now I exist"})
        assert await cache.get("v1", lambda: loader("v1")) == {"title": "Now I exist"}
