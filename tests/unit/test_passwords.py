"""Password hashing: Argon2id, and an unknown username costs a full verification."""

from __future__ import annotations

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
