"""Read-through caching in Redis that survives the three classic failure modes.

- **Avalanche** (many entries expiring at once, so the database takes every read in the
  same second): each entry lives ``ttl`` plus a random ``jitter``.
- **Penetration** (reads of ids that do not exist always miss and always hit the
  database): a miss the loader confirms is cached as a short-lived *negative* entry.
- **Breakdown** (a hot entry expires and a thousand readers rebuild it together): one
  loader per key — in this process through a shared future, across replicas through a
  short Redis lock; the others wait for the entry to appear (bounded), then read it.

Values are stored as text by ``encode``/``decode`` (JSON, typically). Writers call
``invalidate`` after their transaction commits.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from shared.kv import KeyValueStore

T = TypeVar("T")

# Stored in place of a value for "this id does not exist"; cannot collide with JSON.
NEGATIVE = "\x00none"

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class ReadThroughCache(Generic[T]):
    def __init__(
        self,
        kv: KeyValueStore,
        *,
        prefix: str,
        encode: Callable[[T], str],
        decode: Callable[[str], T],
        ttl: float = 300.0,
        jitter: float = 60.0,
        negative_ttl: float = 30.0,
        lock_ttl: float = 5.0,
        wait_timeout: float = 2.0,
        poll_interval: float = 0.02,
        rng: random.Random | None = None,
    ) -> None:
        self._kv = kv
        self._prefix = prefix
        self._encode = encode
        self._decode = decode
        self._ttl = ttl
        self._jitter = jitter
        self._negative_ttl = negative_ttl
        self._lock_ttl = lock_ttl
        self._wait_timeout = wait_timeout
        self._poll_interval = poll_interval
        self._rng = rng or random.Random()  # noqa: S311 - spreading expiries, not secrets
        self._release = kv.script(_RELEASE_LOCK)
        self._in_flight: dict[str, asyncio.Future[T | None]] = {}

    def _key(self, key: str) -> str:
        return f"cache:{self._prefix}:{key}"

    async def get(self, key: str, load: Callable[[], Awaitable[T | None]]) -> T | None:
        """The cached value of ``key``, else ``load()``'s (None: it does not exist)."""
        cached = await self._kv.get(self._key(key))
        if cached is not None:
            return None if cached == NEGATIVE else self._decode(cached)
        pending = self._in_flight.get(key)
        if pending is not None:
            # shield: one waiter giving up must not cancel the load the others wait on.
            return await asyncio.shield(pending)
        future: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            value = await self._load_once_across_replicas(key, load)
        except BaseException as error:
            future.set_exception(error)
            # Retrieved here so an exception nobody else awaited is not reported as lost.
            future.exception()
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._in_flight[key]

    async def _load_once_across_replicas(
        self, key: str, load: Callable[[], Awaitable[T | None]]
    ) -> T | None:
        lock_key = self._key(key) + ":lock"
        token = secrets.token_hex(8)
        if not await self._kv.set(lock_key, token, ex=self._lock_ttl, nx=True):
            # Another replica is loading: wait for its entry rather than load again.
            waited = await self._wait_for_entry(key)
            if waited is not None:
                return None if waited == NEGATIVE else self._decode(waited)
            # It took too long (or died holding the lock): load ourselves.
        try:
            value = await load()
            await self._store(key, value)
            return value
        finally:
            await self._release(keys=[lock_key], args=[token])

    async def _wait_for_entry(self, key: str) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_timeout
        while loop.time() < deadline:
            await asyncio.sleep(self._poll_interval)
            cached = await self._kv.get(self._key(key))
            if cached is not None:
                return cached
        return None

    async def _store(self, key: str, value: T | None) -> None:
        if value is None:
            await self._kv.set(self._key(key), NEGATIVE, ex=self._negative_ttl)
            return
        ttl = self._ttl + self._rng.uniform(0, self._jitter)
        await self._kv.set(self._key(key), self._encode(value), ex=ttl)

    async def invalidate(self, key: str) -> None:
        """Forget ``key`` (positive or negative entry); the next read loads it again."""
        await self._kv.delete(self._key(key))
