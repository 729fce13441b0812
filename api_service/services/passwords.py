"""Argon2id password hashing, off the event loop (a hash costs 150-350 ms here)."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


class PasswordHasher:
    def __init__(self, *, time_cost: int, memory_kib: int) -> None:
        self._argon2 = Argon2Hasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=1, type=Type.ID
        )
        # Verified against when the username does not exist, so that a failed sign-in
        # takes as long whether or not the account is real.
        self._decoy_hash = self._argon2.hash("decoy password that matches nothing")

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._argon2.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when ``password`` matches; ``stored_hash=None`` costs the same and is False."""
        target = stored_hash if stored_hash is not None else self._decoy_hash
        try:
            matched = await asyncio.to_thread(self._argon2.verify, target, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return matched and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when the hash was made with other parameters than today's."""
        return self._argon2.check_needs_rehash(stored_hash)
