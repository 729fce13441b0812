"""Read-through caching in Redis that survives the three classic failure modes.

- **Avalanche** (many entries expiring at once, so the database takes every read in the
  same second): each entry lives ``ttl`` plus a random ``jitter``.
- **Penetration** (reads of ids that do not exist always miss and always hit the
  database): a miss the loader confirms is cached as a short-lived *negative* entry.
- **Breakdown** (a hot entry expires and a thousand readers rebuild it together): one
  loader per key — in this process through a shared future, across replicas through a
  short Redis lock; the others wait for the entry to appear (bounded), then read it.

Values are stored as text by ``encode``/``decode`` (JSON, typically). Writers call
``invalidate`` (or ``forget_cached``) after their transaction commits.

A cache may also keep a **local copy** of hot entries in the process (``LocalCopies``),
so a read of one costs a dict lookup, not a Redis round trip. Copies are only trusted
while the process is subscribed to the invalidation channel (``CacheInvalidations``):
every invalidation deletes the Redis entry, then publishes its key, and each subscribed
process drops its copy on receipt, within a millisecond or so on a healthy Redis. While
the subscription is down (Redis restarting, the connection lost), local copies are
neither used nor kept: reads go to Redis as before, so a missed message can never keep
a stale copy alive. Only values are copied, never "does not exist": a video created
a moment ago must not stay invisible here while Redis already knows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Final, Generic, TypeVar

from shared.kv import KeyValueError, KeyValueStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Stored in place of a value for "this id does not exist"; cannot collide with JSON.
NEGATIVE = "\x00none"
# Pub/sub channel (in the store's namespace) carrying "<prefix> <key>" for every entry
# invalidated, so processes holding a local copy drop it.
INVALIDATIONS_CHANNEL: Final = "cache-invalidations"
# How long a local copy is trusted at most, even with the subscription up: a bound on
# staleness should a message ever be lost on a connection that looks healthy.
LOCAL_TTL_SECONDS: Final = 30.0
LOCAL_MAX_ENTRIES: Final = 10_000
# Pause between attempts to resubscribe after the connection to Redis was lost.
RESUBSCRIBE_SECONDS: Final = 1.0


def entry_key(prefix: str, key: str) -> str:
    """The Redis key of ``key``'s entry in the cache of ``prefix``."""
    return f"cache:{prefix}:{key}"


async def forget_cached(kv: KeyValueStore, prefix: str, keys: Iterable[str]) -> None:
    """Deletes the entries of ``keys`` from the cache of ``prefix`` in Redis, then tells
    every process to drop its local copy. Call after the change has committed."""
    keys = list(keys)
    if not keys:
        return
    await kv.delete(*(entry_key(prefix, key) for key in keys))
    for key in keys:
        await kv.publish(INVALIDATIONS_CHANNEL, f"{prefix} {key}")


class LocalCopies(Generic[T]):
    """A process's copies of one cache's entries; trusted only while ``invalidations`` is
    subscribed, and each for ``ttl`` seconds at most. Made by ``CacheInvalidations``."""

    def __init__(self, invalidations: CacheInvalidations, *, ttl: float, max_entries: int) -> None:
        self._invalidations = invalidations
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, T]] = {}

    def get(self, key: str) -> T | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if not self._invalidations.live or time.monotonic() >= expires:
            del self._entries[key]
            return None
        return value

    @property
    def generation(self) -> int:
        """Changes with every invalidation received (and every loss of the subscription)."""
        return self._invalidations.generation

    def put(self, key: str, value: T, generation: int) -> None:
        """Keeps ``value``, read when ``generation`` was current, unless an invalidation
        has arrived since (the value may be what it invalidated) or copies are untrusted."""
        if generation != self._invalidations.generation or not self._invalidations.live:
            return
        if len(self._entries) >= self._max_entries:
            # The oldest copy goes first (dicts keep insertion order).
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (time.monotonic() + self._ttl, value)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class CacheInvalidations:
    """The one subscription of a process to the invalidation channel, feeding the local
    copies of all its caches. ``run()`` is the task an app keeps for its lifetime."""

    def __init__(self, kv: KeyValueStore, *, resubscribe_seconds: float = RESUBSCRIBE_SECONDS):
        self._kv = kv
        self._resubscribe_seconds = resubscribe_seconds
        self._copies: dict[str, list[LocalCopies[Any]]] = {}
        self.live = False
        self.generation = 0
        self._subscribed = asyncio.Event()

    def local_copies(
        self, prefix: str, *, ttl: float = LOCAL_TTL_SECONDS, max_entries: int = LOCAL_MAX_ENTRIES
    ) -> LocalCopies[Any]:
        """A new set of local copies for the cache of ``prefix``."""
        copies: LocalCopies[Any] = LocalCopies(self, ttl=ttl, max_entries=max_entries)
        self._copies.setdefault(prefix, []).append(copies)
        return copies

    async def wait_subscribed(self) -> None:
        """Returns once the subscription is confirmed (tests and start-up ordering)."""
        await self._subscribed.wait()

    def _forget_everything(self) -> None:
        self.generation += 1
        for copies_of_prefix in self._copies.values():
            for copies in copies_of_prefix:
                copies.clear()

    def forget(self, prefix: str, key: str) -> None:
        """Drops every local copy of ``key`` in the caches of ``prefix``; a read of it
        already under way will not keep what it finds."""
        self.generation += 1
        for copies in self._copies.get(prefix, ()):
            copies.drop(key)

    def _received(self, message: str) -> None:
        prefix, _, key = message.partition(" ")
        self.forget(prefix, key)

    async def run(self) -> None:
        """Subscribes, and resubscribes after every loss, until cancelled."""
        while True:
            try:
                async with self._kv.subscribe(INVALIDATIONS_CHANNEL) as messages:
                    # Whatever changed while unsubscribed is unknown: start afresh.
                    self._forget_everything()
                    self.live = True
                    self._subscribed.set()
                    async for message in messages:
                        self._received(message)
            except KeyValueError as error:
                logger.warning("cache invalidations unsubscribed (%s); retrying", error)
            finally:
                self.live = False
                self._subscribed.clear()
                self._forget_everything()
            await asyncio.sleep(self._resubscribe_seconds)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CacheInvalidations]:
        """``run()`` as a task for the duration of the block."""
        task = asyncio.create_task(self.run(), name="cache-invalidations")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


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
        invalidations: CacheInvalidations | None = None,
        keep_local_copies: bool = False,
    ) -> None:
        """``invalidations``: this process's subscription; with it, ``invalidate`` drops
        local copies here at once, and ``keep_local_copies`` keeps copies of values."""
        self._kv = kv
        self._invalidations = invalidations
        self._local: LocalCopies[T] | None = (
            invalidations.local_copies(prefix)
            if invalidations is not None and keep_local_copies
            else None
        )
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
        return entry_key(self._prefix, key)

    async def get(self, key: str, load: Callable[[], Awaitable[T | None]]) -> T | None:
        """The cached value of ``key``, else ``load()``'s (None: it does not exist)."""
        local = self._local
        if local is None:
            return await self._get_shared(key, load)
        value = local.get(key)
        if value is not None:
            return value
        generation = local.generation
        value = await self._get_shared(key, load)
        if value is not None:
            local.put(key, value, generation)
        return value

    async def _get_shared(self, key: str, load: Callable[[], Awaitable[T | None]]) -> T | None:
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
        """Forget ``key`` (positive or negative entry) in Redis and in every process's
        local copies; the next read loads it again."""
        if self._invalidations is not None:
            # Here at once, even should Redis fail below: this process's next read must
            # not wait for the message.
            self._invalidations.forget(self._prefix, key)
        try:
            await forget_cached(self._kv, self._prefix, [key])
        finally:
            if self._invalidations is not None:
                # Again: a read that began before the Redis entry went may have copied it.
                self._invalidations.forget(self._prefix, key)
