"""What a user's files take up, for the per-user quota (``VOD_USER_QUOTA_BYTES``).

A user's usage is the sum of the sizes of:

1. their videos that are not deleted (a deleted video frees its space at once, when the
   DELETE is answered, not when the scheduler gets round to removing it);
2. their finished uploads that no video uses yet, for ``unused_window`` after they
   finished (the time an unreferenced file is kept for its uploader to make a video of
   it; after that the collector may remove the file, so it takes up nothing);
3. their uploads in progress, at their announced size, from creation until they finish,
   are deleted or expire.

Sizes are logical: a file two users share through dedup counts for both, because either
could be the only one keeping it.

(1) and (2) are read from the database. (3) is a Redis hash per user, upload id → size
(``reservations_key``), checked and extended atomically by one Lua script, so two
concurrent creations by one user cannot both take the last free bytes. Entries whose
upload state has gone (expired, deleted) or is complete (now counted by the database) are
dropped by that same script, so the hash never needs a sweeper.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import and_, func, select

from shared.db import Database
from shared.db.schema import uploads, videos
from shared.kv import KeyValueStore
from shared.layout import upload_state_key

# A member listed by HGETALL may have been joined by a newer one by the time the script
# runs; the script then asks to be called again with the new list (a rare race).
RESERVE_ATTEMPTS: Final = 5


def reservations_key(owner_id: str) -> str:
    """The Redis hash of a user's uploads in progress: upload id → announced size."""
    return f"upload_quota:{owner_id}"


# KEYS: reservations, then the state key of each member named in ARGV[5..], in order.
# ARGV: upload id, size, allowance (quota less the database's usage), ttl_ms, members...
_RESERVE_LUA = """
local listed = {}
for i = 5, #ARGV do listed[ARGV[i]] = KEYS[i - 3] end
local fields = redis.call('HGETALL', KEYS[1])
local used = 0
for i = 1, #fields, 2 do
    local state_key = listed[fields[i]]
    if not state_key then return {'retry', 0} end
    local state = redis.call('HGET', state_key, 'state')
    if (not state) or state == 'complete' then
        redis.call('HDEL', KEYS[1], fields[i])
    elseif fields[i] ~= ARGV[1] then
        used = used + tonumber(fields[i + 1])
    end
end
local remaining = tonumber(ARGV[3]) - used
if tonumber(ARGV[2]) > remaining then return {'exceeded', remaining} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'reserved', remaining - tonumber(ARGV[2])}
"""


class ReserveOutcome(enum.StrEnum):
    RESERVED = "reserved"
    EXCEEDED = "exceeded"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class Reservation:
    outcome: ReserveOutcome
    # Bytes still free after this upload (reserved), or before it (exceeded).
    remaining: int


class QuotaLedger:
    def __init__(self, db: Database, kv: KeyValueStore, *, unused_window: timedelta) -> None:
        self._db = db
        self._kv = kv
        self._unused_window = unused_window
        self._reserve = kv.script(_RESERVE_LUA)

    async def stored_bytes(self, owner_id: str, *, now: datetime) -> int:
        """(1) + (2) of the module docstring: what the database says the user keeps."""
        live_videos = select(func.coalesce(func.sum(videos.c.size), 0)).where(
            videos.c.owner_id == owner_id, videos.c.deleted_at.is_(None)
        )
        unused_uploads = (
            select(func.coalesce(func.sum(uploads.c.size), 0))
            .select_from(uploads.outerjoin(videos, videos.c.upload_id == uploads.c.id))
            .where(
                and_(
                    uploads.c.owner_id == owner_id,
                    videos.c.id.is_(None),
                    uploads.c.completed_at >= now - self._unused_window,
                )
            )
        )
        async with self._db.connect() as conn:
            in_videos = (await conn.execute(live_videos)).scalar_one()
            in_uploads = (await conn.execute(unused_uploads)).scalar_one()
        return int(in_videos) + int(in_uploads)

    async def reserve(
        self, owner_id: str, upload_id: str, *, size: int, allowance: int, ttl: float
    ) -> Reservation:
        """Counts ``upload_id`` (whose state must exist) among the user's uploads in
        progress if ``size`` fits in ``allowance`` less the others'."""
        key = reservations_key(owner_id)
        for _ in range(RESERVE_ATTEMPTS):
            members = sorted(await self._kv.hgetall(key))
            outcome, remaining = await self._reserve(
                keys=[key, *(upload_state_key(member) for member in members)],
                args=[upload_id, size, allowance, max(1, round(ttl * 1000)), *members],
            )
            reservation = Reservation(ReserveOutcome(outcome), int(remaining))
            if reservation.outcome is not ReserveOutcome.RETRY:
                return reservation
        return Reservation(ReserveOutcome.RETRY, 0)

    async def release(self, owner_id: str, upload_id: str) -> None:
        """The upload no longer counts as in progress (finished or deleted)."""
        await self._kv.hdel(reservations_key(owner_id), upload_id)
