"""Leases in Redis: one scheduler replica at a time does a given piece of work.

A lease is a key set with ``SET NX PX`` to a token only its holder knows. The holder renews
it well before it expires and deletes it when done, both through Lua scripts that compare
the token first, so a replica can never extend or remove a lease another one took after
its own had expired. A holder that crashes leaves the key to expire: another replica takes
over after at most ``ttl`` seconds.

What a lease cannot promise (no lease without fencing can): a holder stalled for longer
than ``ttl`` (a frozen VM, a long GC pause) may wake up and finish a step after another
replica took over. Work done under a lease must therefore be safe to do twice; ``hold``
shortens the overlap by cancelling the work as soon as a renewal fails.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from scheduler_service.cancellation import raise_if_cancelled
from shared.kv import KeyValueError, KeyValueStore

T = TypeVar("T")

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLostError(Exception):
    """The lease expired or was taken over while its work was running; the work stopped."""


def replica_name() -> str:
    """Who holds a lease, for people reading Redis: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_of(token: str) -> str:
    """Who holds a lease, from its token (the owner, without the random part)."""
    return token.rpartition(":")[0] or token


class Lease:
    """A named, expiring, exclusive claim; one object per attempt to hold it.

    ``name`` is stored as the key ``lease:<name>`` in the store's namespace. The token is
    ``<owner>:<random>``, so two ``Lease`` objects never share one, even in one process.
    """

    def __init__(
        self, kv: KeyValueStore, name: str, *, ttl: float, owner: str | None = None
    ) -> None:
        if ttl <= 0:
            raise ValueError("a lease's ttl must be positive")
        self.name = name
        self.key = f"lease:{name}"
        self.ttl = ttl
        self.token = f"{owner or replica_name()}:{secrets.token_hex(8)}"
        self._kv = kv
        self._renew = kv.script(_RENEW_LUA)
        self._release = kv.script(_RELEASE_LUA)

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it; False if somebody does."""
        return await self._kv.set(self.key, self.token, ex=self.ttl, nx=True)

    async def renew(self) -> bool:
        """Push the expiry ``ttl`` seconds ahead; False if the lease is no longer ours."""
        milliseconds = max(1, round(self.ttl * 1000))
        return bool(await self._renew(keys=[self.key], args=[self.token, milliseconds]))

    async def release(self) -> bool:
        """Give the lease up; False if it was no longer ours (then nothing is deleted)."""
        return bool(await self._release(keys=[self.key], args=[self.token]))

    async def holder(self) -> str | None:
        """The token of whoever holds the lease now, if anyone."""
        return await self._kv.get(self.key)


async def hold(lease: Lease, work: Callable[[], Awaitable[T]], *, renew_every: float) -> T:
    """Run ``work`` while renewing ``lease`` (already acquired) every ``renew_every`` s.

    Returns what ``work`` returns. If a renewal fails (the lease is someone else's, or the
    store cannot be reached and so the lease may expire), ``work`` is cancelled and
    ``LeaseLostError`` raised. Does not release the lease: the caller does.
    """

    async def run() -> T:
        return await work()

    task = asyncio.create_task(run(), name=f"scheduler:lease:{lease.name}")
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=renew_every)
            if done:
                return task.result()
            try:
                renewed = await lease.renew()
            except KeyValueError as exc:
                raise LeaseLostError(f"lease {lease.name!r} could not be renewed: {exc}") from exc
            raise_if_cancelled()
            if not renewed:
                raise LeaseLostError(f"lease {lease.name!r} expired or was taken over")
    finally:
        if not task.done():
            task.cancel()
            # Waits for the work to unwind, whatever it raises on the way out.
            await asyncio.gather(task, return_exceptions=True)
