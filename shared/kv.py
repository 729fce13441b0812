"""The key-value port: one thin ``KeyValueStore`` over a redis-py asyncio client.

Two adapters behind one class, chosen by URL in ``open_kv``:

- ``redis://`` / ``rediss://``: a real Redis server (services mode). Options redis-py
  understands may ride in the query string (``?socket_timeout=2``).
- ``memory://NAME``: an in-process fakeredis server (standalone mode and tests). Every
  store opened with the same NAME in one process shares one server, because standalone
  runs the four apps in one process and they must see the same data; ``memory://``
  alone is the name ``default``.

Every key and pub/sub channel is stored as ``f"{namespace}:{key}"``; callers never build
prefixes, and two deployments (or test runs) sharing a server never meet. Values are text
(``decode_responses``); bytes are accepted on write and must be UTF-8.

Errors: an unreachable or failing server raises ``KeyValueUnavailableError`` (a 503 if it
reaches a client); a command the server refuses (wrong type, a Lua error) raises
``KeyValueError``. No redis-py exception leaves this module.

Reconnecting: when the server restarts, every pooled connection is closed under us. The
pool checks a connection for that close before handing it out and reconnects, so the
first request after an outage does not fail on a dead connection (see ``open_kv``). A
command that still meets one (the close arriving as it is sent) is sent once more on a
fresh connection when repeating it is harmless: reads, ``PING`` and a plain ``SET``.
Scripts, counters, ``SET NX`` and publishes are never repeated, since the first attempt may
have run before the connection broke.
"""

from __future__ import annotations

import builtins
import logging
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio
import redis.exceptions
from redis.commands.core import AsyncScript
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import EncodableT

from shared.errors import ConfigError, ServiceUnavailableError

__all__ = [
    "TTL_MISSING",
    "TTL_PERSISTENT",
    "KeyValueError",
    "KeyValueStore",
    "KeyValueUnavailableError",
    "Script",
    "Value",
    "open_kv",
]

T = TypeVar("T")
Value = str | bytes | int | float
Score = float | str  # a number, or Redis's "-inf", "+inf", "(5" (exclusive bound)

# What ttl() and pttl() answer for a key that does not exist / never expires (Redis's own).
TTL_MISSING = -2
TTL_PERSISTENT = -1

# Short on purpose: a readiness probe or a request must learn of an outage in seconds,
# not wait out the kernel's TCP timeouts. URL query options override these.
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 5.0
# Connections per process. A command finding them all busy waits for one (up to
# SOCKET_TIMEOUT) instead of failing: redis-py's default pool raised "Too many
# connections", a 503 for every request of a burst past 100 commands in flight.
POOL_CONNECTIONS = 100
# A subscription idle this long sends PING and must hear something within as long again.
# Without it, a connection that dies silently (a partition, a frozen server: no reset)
# leaves a subscriber waiting until TCP gives up, many minutes: live viewers of a replica
# would miss every danmaku meanwhile, and cached copies would outlive their invalidations.
# With it, a silent death ends the subscription within twice this.
SUBSCRIPTION_HEARTBEAT = 10.0

_SCAN_BATCH = 500
_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")

# The TTL is set only when the key has none, i.e. on the INCR that created it: a rate
# limit window must not slide forward with every hit.
_INCR_LUA = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
"""

_memory_servers: dict[str, Any] = {}

logger = logging.getLogger(__name__)


class KeyValueError(Exception):
    """The store refused a command (wrong type, script error): a bug, not an outage."""


class KeyValueUnavailableError(KeyValueError, ServiceUnavailableError):
    """The store cannot be reached or did not answer in time; retrying later may work."""

    code = "kv_unavailable"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(
            detail or "The key-value store is unavailable; try again shortly.",
            headers={"Retry-After": "2"},
        )


@contextmanager
def _translated_errors() -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        logger.warning("key-value store unavailable: %s: %s", type(exc).__name__, exc)
        # The detail may reach a client: the cause (host, port) stays in the chain, for logs.
        raise KeyValueUnavailableError from exc
    except redis.exceptions.RedisError as exc:
        raise KeyValueError(str(exc)) from exc


def _milliseconds(seconds: float) -> int:
    if seconds <= 0:
        raise ValueError("an expiry must be positive")
    return max(1, round(seconds * 1000))


async def _once_more_on_a_broken_connection(command: Callable[[], Awaitable[T]]) -> T:
    """Runs an idempotent ``command``; a second time if its connection was found broken.

    redis-py has already dropped the broken connection, so the second attempt connects
    afresh. Only ``ConnectionError`` is repeated, never a timeout: a server that does not
    answer must cost a caller one timeout, not two. While the server is down the second
    attempt is refused at once, so an outage still answers quickly.
    """
    with _translated_errors():
        try:
            return await command()
        except redis.exceptions.ConnectionError as exc:
            if isinstance(exc, redis.exceptions.TimeoutError):
                raise
            logger.info("key-value store: repeating a command on a new connection: %s", exc)
            return await command()


class Script:
    """A Lua script bound to a store: ``await script(keys=[...], args=[...])``.

    Runs with EVALSHA (loading the script once when the server does not know it). KEYS are
    namespaced like every other key; ARGV pass through untouched. The script must touch
    only the keys it is given, or it escapes the namespace.
    """

    def __init__(self, store: KeyValueStore, script: AsyncScript) -> None:
        self._store = store
        self._script = script

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Value] = ()) -> Any:
        with _translated_errors():
            return await self._script(keys=[self._store.key(k) for k in keys], args=list(args))


class KeyValueStore:
    """Redis commands a vod service needs, with keys confined to ``namespace``."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        namespace: str,
        *,
        subscription_heartbeat: float = SUBSCRIPTION_HEARTBEAT,
    ) -> None:
        if not namespace:
            raise ValueError("a key-value namespace must not be empty")
        self._redis = client
        self._heartbeat = subscription_heartbeat
        self.namespace = namespace
        self._prefix = f"{namespace}:"
        self._incr_script = self.script(_INCR_LUA)

    def key(self, key: str) -> str:
        """The key as stored on the server."""
        return self._prefix + key

    # -- strings ---------------------------------------------------------------------

    async def get(self, key: str) -> str | None:
        return cast(
            "str | None",
            await _once_more_on_a_broken_connection(lambda: self._redis.get(self.key(key))),
        )

    async def set(
        self, key: str, value: Value, *, ex: float | None = None, nx: bool = False
    ) -> bool:
        """Stores ``value``; ``ex`` is a lifetime in seconds, ``nx`` only creates.

        Returns False when ``nx`` is set and the key already existed.
        """
        px = None if ex is None else _milliseconds(ex)

        async def command() -> bool:
            return bool(await self._redis.set(self.key(key), value, px=px, nx=nx))

        if nx:
            # Not repeated: a first attempt that created the key would make it answer False.
            with _translated_errors():
                return await command()
        return await _once_more_on_a_broken_connection(command)

    async def delete(self, *keys: str) -> int:
        """Removes ``keys``; returns how many existed."""
        if not keys:
            return 0
        with _translated_errors():
            return await self._redis.delete(*(self.key(k) for k in keys))

    async def exists(self, key: str) -> bool:
        return bool(
            await _once_more_on_a_broken_connection(lambda: self._redis.exists(self.key(key)))
        )

    async def expire(self, key: str, seconds: float) -> bool:
        """Sets the lifetime of ``key``; zero or less deletes it at once (as Redis does).

        Returns False when the key does not exist.
        """
        # PEXPIRE rather than EXPIRE: fractions of a second survive.
        milliseconds = round(seconds * 1000) if seconds > 0 else 0
        with _translated_errors():
            return bool(await self._redis.pexpire(self.key(key), milliseconds))

    async def ttl(self, key: str) -> int:
        """Whole seconds ``key`` has left, as Redis's TTL: ``TTL_MISSING`` (-2) if there is
        no such key, ``TTL_PERSISTENT`` (-1) if it never expires."""
        return await _once_more_on_a_broken_connection(lambda: self._redis.ttl(self.key(key)))

    async def pttl(self, key: str) -> int:
        """Like ``ttl`` in milliseconds (the same -2 and -1)."""
        return await _once_more_on_a_broken_connection(lambda: self._redis.pttl(self.key(key)))

    async def incr(self, key: str, amount: int = 1, *, ex: float | None = None) -> int:
        """Adds ``amount`` atomically; ``ex`` sets the lifetime only when the key is new."""
        px = "" if ex is None else str(_milliseconds(ex))
        return int(await self._incr_script(keys=[key], args=[amount, px]))

    # -- sets ------------------------------------------------------------------------

    async def sadd(self, key: str, *members: Value) -> int:
        with _translated_errors():
            return await self._redis.sadd(self.key(key), *members)

    async def srem(self, key: str, *members: Value) -> int:
        with _translated_errors():
            return await self._redis.srem(self.key(key), *members)

    async def smembers(self, key: str) -> builtins.set[str]:
        members = await _once_more_on_a_broken_connection(
            lambda: self._redis.smembers(self.key(key))
        )
        return cast("builtins.set[str]", members)

    async def scard(self, key: str) -> int:
        return await _once_more_on_a_broken_connection(lambda: self._redis.scard(self.key(key)))

    async def sismember(self, key: str, member: str) -> bool:
        return bool(
            await _once_more_on_a_broken_connection(
                lambda: self._redis.sismember(self.key(key), member)
            )
        )

    # -- hashes ----------------------------------------------------------------------

    async def hset(self, key: str, mapping: Mapping[str, Value]) -> int:
        """Sets the fields of ``mapping``; returns how many were new."""
        with _translated_errors():
            fields: dict[EncodableT, EncodableT] = dict(mapping.items())
            return await self._redis.hset(self.key(key), mapping=fields)

    async def hget(self, key: str, field: str) -> str | None:
        return cast(
            "str | None",
            await _once_more_on_a_broken_connection(lambda: self._redis.hget(self.key(key), field)),
        )

    async def hgetall(self, key: str) -> dict[str, str]:
        fields = await _once_more_on_a_broken_connection(lambda: self._redis.hgetall(self.key(key)))
        return cast("dict[str, str]", fields)

    async def hdel(self, key: str, *fields: str) -> int:
        with _translated_errors():
            return await self._redis.hdel(self.key(key), *fields)

    # -- sorted sets -----------------------------------------------------------------

    async def zadd(self, key: str, mapping: Mapping[str, float]) -> int:
        """Adds or re-scores members; returns how many were new."""
        with _translated_errors():
            added = await self._redis.zadd(self.key(key), dict(mapping))
        return int(added or 0)

    async def zrangebyscore(
        self, key: str, min: Score, max: Score, *, offset: int = 0, limit: int | None = None
    ) -> list[str]:
        """Members with ``min <= score <= max``, lowest score first."""
        start: int | None = None
        num: int | None = None
        if limit is not None or offset:
            start, num = offset, -1 if limit is None else limit
        members = await _once_more_on_a_broken_connection(
            lambda: self._redis.zrangebyscore(self.key(key), min, max, start=start, num=num)
        )
        return cast("list[str]", members)

    async def zrem(self, key: str, *members: str) -> int:
        with _translated_errors():
            return await self._redis.zrem(self.key(key), *members)

    async def zcard(self, key: str) -> int:
        return await _once_more_on_a_broken_connection(lambda: self._redis.zcard(self.key(key)))

    # -- scripts ---------------------------------------------------------------------

    def script(self, lua_source: str) -> Script:
        """Registers ``lua_source``; no round trip until the first call."""
        return Script(self, self._redis.register_script(lua_source))

    # -- pub/sub ---------------------------------------------------------------------

    async def publish(self, channel: str, message: str | bytes) -> int:
        """Sends ``message`` on ``channel``; returns how many subscribers received it."""
        with _translated_errors():
            return await self._redis.publish(self.key(channel), message)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[str]]:
        """``async with kv.subscribe("ch") as messages: async for text in messages: ...``

        The subscription is confirmed by the server before the block is entered, so a
        message published after that is never missed. The iterator ends with the block,
        or raises ``KeyValueUnavailableError`` when the connection is lost, including
        silently (``SUBSCRIPTION_HEARTBEAT``).
        """
        pubsub = self._redis.pubsub()
        messages: AsyncGenerator[str, None] | None = None
        try:
            with _translated_errors():
                await pubsub.subscribe(self.key(channel))
                confirmed = await pubsub.get_message(timeout=SOCKET_TIMEOUT)
            if confirmed is None or confirmed["type"] != "subscribe":
                raise KeyValueUnavailableError("The key-value store did not confirm SUBSCRIBE.")
            messages = _messages(pubsub, self._heartbeat)
            yield messages
        finally:
            if messages is not None:
                await messages.aclose()
            try:
                with _translated_errors():
                    # Explicit: fakeredis keeps a closed connection's subscriptions.
                    await pubsub.unsubscribe()
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py 8.1

    # -- housekeeping ----------------------------------------------------------------

    async def ping(self) -> None:
        """Returns when the server answers; raises ``KeyValueUnavailableError`` otherwise."""
        await _once_more_on_a_broken_connection(self._redis.ping)

    async def delete_namespace(self) -> int:
        """Removes every key of this namespace (SCAN + UNLINK); for tests and tools."""
        pattern = _GLOB_SPECIALS.sub(r"\\\1", self._prefix) + "*"
        removed = 0
        with _translated_errors():
            batch: list[str] = []
            async for key in self._redis.scan_iter(match=pattern, count=_SCAN_BATCH):
                batch.append(key)
                if len(batch) >= _SCAN_BATCH:
                    removed += await self._redis.unlink(*batch)
                    batch.clear()
            if batch:
                removed += await self._redis.unlink(*batch)
        return removed

    async def close(self) -> None:
        with _translated_errors():
            await self._redis.aclose()


async def _messages(
    pubsub: redis.asyncio.client.PubSub, heartbeat: float
) -> AsyncGenerator[str, None]:
    pinged = False
    while True:
        with _translated_errors():
            message = await pubsub.get_message(timeout=heartbeat)
        if message is None:
            if pinged:
                raise KeyValueUnavailableError(
                    "The key-value store stopped answering on a subscription."
                )
            with _translated_errors():
                await pubsub.ping()
            pinged = True
            continue
        pinged = False  # anything that arrives, the PING's answer too, proves it alive
        if message["type"] == "message":
            yield cast("str", message["data"])


async def open_kv(
    url: str, namespace: str, *, subscription_heartbeat: float = SUBSCRIPTION_HEARTBEAT
) -> KeyValueStore:
    """A store for ``url`` (``redis://``, ``rediss://`` or ``memory://NAME``).

    Does not connect: an unreachable server shows in ``ping()`` (the readiness probe) and
    in the first command, so a service starts and reports unready instead of crashing.
    """
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_CONNECTIONS,
            timeout=SOCKET_TIMEOUT,
            decode_responses=True,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            # Off, not redis-py's "auto": while maintenance notifications may be on, the
            # pool skips its check that a connection it hands out was not closed by the
            # server, and after a Redis restart every pooled connection would fail one
            # command. They are a managed-Redis feature a plain server does not send.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        # from_pool: the client owns the pool and closes it with itself.
        return KeyValueStore(
            redis.asyncio.Redis.from_pool(pool),
            namespace,
            subscription_heartbeat=subscription_heartbeat,
        )
    if parts.scheme == "memory":
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError("VOD_REDIS_URL", "a memory:// URL is just memory://NAME")
        # Imported here: it costs a service process a third of a second at start-up, and
        # only standalone mode and tests use it.
        import fakeredis  # noqa: PLC0415

        name = parts.netloc or "default"
        server = _memory_servers.get(name)
        if server is None:
            server = _memory_servers[name] = fakeredis.FakeServer()
        client = fakeredis.FakeAsyncRedis(
            server=server,
            decode_responses=True,
            # The same waiting pool as for a real server (see POOL_CONNECTIONS).
            connection_pool_class=redis.asyncio.BlockingConnectionPool,
            max_connections=POOL_CONNECTIONS,
        )
        return KeyValueStore(client, namespace, subscription_heartbeat=subscription_heartbeat)
    raise ConfigError(
        "VOD_REDIS_URL", f"scheme {parts.scheme or '(none)'!r} is not redis, rediss or memory"
    )
