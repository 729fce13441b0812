"""Argon2id password hashing, off the event loop (a hash costs 150-350 ms here).

Each hash takes the configured memory (64 MiB by default) for as long as it runs, so a
flood of sign-ups or sign-ins must not start them all at once: they run on a pool of
``concurrency`` threads of their own and the rest wait in its queue. A dedicated pool,
rather than a semaphore around ``asyncio.to_thread``, because a request cancelled while
its hash runs (the client went away) cannot stop the thread: a semaphore would be
released while the memory is still in use, and the next hash would start beside it. The
pool's threads are the bound, whatever happens to the requests waiting on them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

T = TypeVar("T")


class PasswordHasher:
    def __init__(self, *, time_cost: int, memory_kib: int, concurrency: int = 4) -> None:
        self._argon2 = Argon2Hasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=1, type=Type.ID
        )
        # Verified against when the username does not exist, so that a failed sign-in
        # takes as long whether or not the account is real.
        self._decoy_hash = self._argon2.hash("decoy password that matches nothing")
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="argon2")
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Hashes queued for a free thread (all ``concurrency`` of them busy)."""
        return self._waiting

    async def _run(self, work: Callable[[], T]) -> T:
        with self._lock:
            self._waiting += 1

        def started() -> T:
            with self._lock:
                self._waiting -= 1
            return work()

        def done(future: Future[T]) -> None:
            # Cancelled before a thread took it (the request went away): it never runs.
            if future.cancelled():
                with self._lock:
                    self._waiting -= 1

        future = self._pool.submit(started)
        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    async def hash(self, password: str) -> str:
        return await self._run(partial(self._argon2.hash, password))

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when ``password`` matches; ``stored_hash=None`` costs the same and is False."""
        target = stored_hash if stored_hash is not None else self._decoy_hash
        try:
            matched = await self._run(partial(self._argon2.verify, target, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return matched and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when the hash was made with other parameters than today's."""
        return self._argon2.check_needs_rehash(stored_hash)

    def close(self) -> None:
        """Drops the queued hashes; the threads end once their running hash is done."""
        self._pool.shutdown(wait=False, cancel_futures=True)
