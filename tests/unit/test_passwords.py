"""Password hashing: Argon2id, and an unknown username costs a full verification."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from api_service.services.passwords import PasswordHasher


@pytest.fixture
def hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_kib=1024)


async def test_hashes_are_argon2id_salted_and_verify(hasher: PasswordHasher) -> None:
    first = await hasher.hash("correct horse")
    second = await hasher.hash("correct horse")
    assert first.startswith("$argon2id$")
    assert first != second  # a fresh salt each time
    assert "correct horse" not in first
    assert await hasher.verify(first, "correct horse")
    assert not await hasher.verify(first, "wrong horse")
    assert not await hasher.verify("not-a-hash", "correct horse")


async def test_unknown_user_runs_the_same_argon2_verification(
    hasher: PasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No early return for a missing account: the decoy hash is verified instead."""
    verified: list[str] = []
    real = hasher._argon2

    class Spy:
        def verify(self, stored: str, password: str) -> Any:
            verified.append(stored)
            return real.verify(stored, password)

    monkeypatch.setattr(hasher, "_argon2", Spy())
    assert not await hasher.verify(None, "decoy password that matches nothing")
    assert len(verified) == 1
    assert verified[0].startswith("$argon2id$")


async def test_changed_parameters_ask_for_a_rehash(hasher: PasswordHasher) -> None:
    stronger = PasswordHasher(time_cost=2, memory_kib=2048)
    old = await hasher.hash("correct horse")
    assert stronger.needs_rehash(old)
    assert not hasher.needs_rehash(old)


async def test_at_most_concurrency_hashes_run_at_once_even_when_callers_give_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each hash holds its memory while it runs: a burst queues past the bound, and a
    caller cancelled mid-hash (a client gone) does not let the next one start beside it."""
    hasher = PasswordHasher(time_cost=1, memory_kib=1024, concurrency=2)
    loop = asyncio.get_running_loop()
    real = hasher._argon2
    lock = threading.Lock()
    release = threading.Event()
    both_running = asyncio.Event()
    running = most = 0

    class Held:
        def hash(self, password: str) -> str:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
                if running == 2:
                    loop.call_soon_threadsafe(both_running.set)
            try:
                # Bounded only so that a broken test cannot hang the run.
                assert release.wait(60)
                return real.hash(password)
            finally:
                with lock:
                    running -= 1

    monkeypatch.setattr(hasher, "_argon2", Held())
    try:
        first = [asyncio.ensure_future(hasher.hash(f"first {i}")) for i in range(2)]
        queued = asyncio.ensure_future(hasher.hash("third"))
        await both_running.wait()
        assert hasher.waiting == 1
        # The two callers go away; their hashes still run, so the third still waits.
        for task in first:
            task.cancel()
        await asyncio.gather(*first, return_exceptions=True)
        late = asyncio.ensure_future(hasher.hash("fourth"))
        await asyncio.sleep(0)  # one turn of the loop: the task submits its hash
        assert hasher.waiting == 2
        assert most == 2
    finally:
        release.set()
    third, fourth = await asyncio.gather(queued, late)
    assert most == 2
    assert real.verify(third, "third")
    assert real.verify(fourth, "fourth")
    assert hasher.waiting == 0
    hasher.close()


async def test_a_hash_cancelled_while_queued_never_runs() -> None:
    hasher = PasswordHasher(time_cost=1, memory_kib=1024, concurrency=1)
    blocker = threading.Event()
    loop = asyncio.get_running_loop()
    busy = loop.run_in_executor(hasher._pool, blocker.wait, 60)
    queued = asyncio.ensure_future(hasher.hash("never"))
    await asyncio.sleep(0)  # one turn of the loop: the task submits its hash
    assert hasher.waiting == 1
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    assert hasher.waiting == 0
    blocker.set()
    await busy
    hasher.close()
