"""Revocations of access tokens and refresh families: durable, and pushed to live sockets.

A revocation is written three times, in this order:

1. the database (``token_revocations``), until the moment no token it names can pass
   the gateway any more: this copy survives a Redis restart or flush;
2. Redis (``revoked:jti:<id>`` / ``revoked:family:<id>``) with the same lifetime: what
   the gateway reads on every signed request;
3. a message on ``REVOCATIONS_CHANNEL``: every api replica closes the live sockets
   opened with a token it names (``api_service.live.token_watch``).

Restoring: a store that lacks ``REVOCATIONS_RESTORED_KEY`` has lost (or never had) the
revocations; ``restore_if_empty`` copies the unexpired rows back and then sets that key.
Every api replica runs it at start-up, when its revocation subscription comes back (a
Redis restart drops every connection) and every ``RESTORE_CHECK_SECONDS`` (a flush drops
none), so a revoked token stays refused across any of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Final

from api_service.repositories.token_revocations import Revocation, TokenRevocationRepository
from shared.auth import (
    REVOCATIONS_CHANNEL,
    REVOCATIONS_RESTORED_KEY,
    revoked_family_key,
    revoked_token_key,
)
from shared.db import DatabaseUnavailableError
from shared.kv import KeyValueError, KeyValueStore

logger = logging.getLogger(__name__)

# How often each api replica checks that the store still holds the revocations.
RESTORE_CHECK_SECONDS: Final = 1.0
KIND_TOKEN: Final = "jti"  # noqa: S105 - a kind of revocation, not a secret
KIND_FAMILY: Final = "family"


def revocation_key(kind: str, subject: str) -> str:
    """The Redis key the gateway looks up for a revocation of ``kind``."""
    if kind == KIND_TOKEN:
        return revoked_token_key(subject)
    return revoked_family_key(subject)


class Revocations:
    def __init__(
        self,
        *,
        kv: KeyValueStore,
        repository: TokenRevocationRepository,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._kv = kv
        self._repository = repository
        self._clock = clock
        # How many times this process restored the store (tests wait on it).
        self.restores = 0
        self._restored = asyncio.Condition()

    async def revoke_token(self, token_id: str, *, expires_at: int) -> None:
        """Revokes one access token until ``expires_at`` (its ``exp``, epoch seconds)."""
        await self._revoke(KIND_TOKEN, token_id, datetime.fromtimestamp(expires_at, UTC))

    async def revoke_family(self, family_id: str, *, seconds: float) -> None:
        """Revokes every access token of a refresh family for ``seconds`` (enough for the
        newest of them to expire)."""
        await self._revoke(KIND_FAMILY, family_id, self._clock() + timedelta(seconds=seconds))

    async def _revoke(self, kind: str, subject: str, expires_at: datetime) -> None:
        now = self._clock()
        # At least a second: a token at the very end of its life is still refused.
        expires_at = max(expires_at, now + timedelta(seconds=1))
        expires_at = await self._repository.add(
            Revocation(kind=kind, subject=subject, expires_at=expires_at), now=now
        )
        await self._kv.set(
            revocation_key(kind, subject), "1", ex=(expires_at - now).total_seconds()
        )
        await self._kv.publish(REVOCATIONS_CHANNEL, f"{kind} {subject}")

    async def restore_if_empty(self) -> bool:
        """Copies every unexpired revocation into the store if it lacks them; True if so."""
        if await self._kv.exists(REVOCATIONS_RESTORED_KEY):
            return False
        now = self._clock()
        restored = 0
        async for revocation in self._repository.unexpired(now):
            await self._kv.set(
                revocation_key(revocation.kind, revocation.subject),
                "1",
                ex=(revocation.expires_at - now).total_seconds(),
            )
            restored += 1
        # Last: while it is missing, every replica that looks restores again.
        await self._kv.set(REVOCATIONS_RESTORED_KEY, now.isoformat())
        logger.info("revocations: restored %d into the key-value store", restored)
        async with self._restored:
            self.restores += 1
            self._restored.notify_all()
        return True

    async def try_restore(self) -> bool:
        """``restore_if_empty``, logging rather than raising when a back end is down (the
        next check tries again)."""
        try:
            return await self.restore_if_empty()
        except (KeyValueError, DatabaseUnavailableError) as error:
            logger.warning("revocations: cannot check or restore the store: %s", error)
            return False

    async def keep_restored(
        self,
        after_restore: Callable[[], Awaitable[None]],
        interval: float = RESTORE_CHECK_SECONDS,
    ) -> None:
        """Checks the store every ``interval`` seconds, until cancelled; after each
        restore, ``after_restore()`` (what was let through meanwhile is looked at again)."""
        while True:
            if await self.try_restore():
                await after_restore()
            await asyncio.sleep(interval)

    async def wait_for_restores(self, count: int) -> None:
        """Returns once this process has restored the store ``count`` times in all."""
        async with self._restored:
            await self._restored.wait_for(lambda: self.restores >= count)
