"""What a user's files take up, for the per-user quota (``VOD_USER_QUOTA_BYTES``), and how
many uploads they have in progress (``VOD_MAX_UPLOADS_IN_PROGRESS``).

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

(1) and (2) are read from the database. (3) is the user's *ledger* in Redis, kept as
running totals so that starting an upload costs the same with 1 or 1,000 in progress:

- ``ledger_key``: a hash of ``bytes`` and ``count`` (the uploads in progress), ``gen``
  (how many of them have finished so far) and ``up:<upload id>`` → announced size;
- ``ledger_due_key``: a sorted set of upload id → when its state expires (ms, Redis's
  clock), moved forward whenever the state's TTL is.

Every change of an upload's life changes its ledger in the same Lua script as its state
(``LEDGER_LUA`` holds the functions they share): ``admit`` stores the state only if the
upload fits; recording a chunk (or a tus append) moves its deadline with the state's TTL;
finishing and deleting take it out. An upload whose state expired is taken out by the next
``admit`` of its owner, from the deadlines: no sweeper is needed, and no state is read.

The database and Redis are read at two moments, and an upload finishing in between would
be in neither. So a finish also counts ``gen`` up, and ``admit`` is given the ``gen`` read
before the database was: when they differ, an upload moved from Redis to the database
meanwhile, and the caller reads again (``ReserveOutcome.RETRY``). The opposite order (a
finished upload in the database and still in the ledger, until its state is marked
complete a moment later) counts it twice, which refuses too much, never too little.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import and_, func, select

from shared.db import Database
from shared.db.schema import uploads, videos
from shared.kv import KeyValueStore
from shared.layout import upload_state_key

# How often ``admit`` reads the database and the ledger again while uploads of the same
# user keep finishing in between; then the caller answers 409 ``uploads_busy``.
RESERVE_ATTEMPTS: Final = 5
# ``allowance`` meaning "no quota".
UNLIMITED: Final = -1


def ledger_key(owner_id: str) -> str:
    """The Redis hash of a user's uploads in progress (see the module docstring)."""
    return f"upload_ledger:{owner_id}"


def ledger_due_key(owner_id: str) -> str:
    """The Redis sorted set of a user's uploads in progress by the time they expire."""
    return f"{ledger_key(owner_id)}:due"


def ledger_keys(owner_id: str) -> list[str]:
    """The two ledger keys, in the order the scripts take them."""
    return [ledger_key(owner_id), ledger_due_key(owner_id)]


# Prepended to every script that changes an upload's ledger. A deadline is read from the
# clock after the state's PEXPIRE and rounded up, so it is never before the state expires:
# a member is taken out only once its state is surely gone.
LEDGER_LUA = """
local function ledger_now()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ledger_keep(ledger, due)
    local last = redis.call('ZRANGE', due, -1, -1, 'WITHSCORES')
    if last[2] then
        local at = math.floor(tonumber(last[2]))
        redis.call('PEXPIREAT', ledger, at)
        redis.call('PEXPIREAT', due, at)
    end
end
local function ledger_touch(ledger, due, id, ttl_ms)
    redis.call('ZADD', due, 'XX', ledger_now() + tonumber(ttl_ms) + 1, id)
    ledger_keep(ledger, due)
end
local function ledger_release(ledger, due, id)
    redis.call('ZREM', due, id)
    local size = redis.call('HGET', ledger, 'up:' .. id)
    if not size then return 0 end
    redis.call('HDEL', ledger, 'up:' .. id)
    redis.call('HINCRBY', ledger, 'bytes', -tonumber(size))
    redis.call('HINCRBY', ledger, 'count', -1)
    return 1
end
local function ledger_finish(ledger, due, id, ttl_ms)
    ledger_release(ledger, due, id)
    redis.call('HINCRBY', ledger, 'gen', 1)
    if redis.call('PTTL', ledger) < 0 then redis.call('PEXPIRE', ledger, ttl_ms) end
end
"""

# KEYS: ledger, due, state. ARGV: upload id, size, allowance (UNLIMITED: no quota), the
# cap on uploads in progress, gen read before the database ('' when not compared), ttl_ms,
# then the state's field, value pairs.
_ADMIT_LUA = (
    LEDGER_LUA
    + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ledger_now())
for _, id in ipairs(expired) do ledger_release(KEYS[1], KEYS[2], id) end
if ARGV[5] ~= '' and (redis.call('HGET', KEYS[1], 'gen') or '0') ~= ARGV[5] then
    return {'retry', 0}
end
local count = tonumber(redis.call('HGET', KEYS[1], 'count') or '0')
if count >= tonumber(ARGV[4]) then return {'too_many', count} end
local size = tonumber(ARGV[2])
local remaining = -1
if tonumber(ARGV[3]) >= 0 then
    remaining = tonumber(ARGV[3]) - tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
    if size > remaining then return {'exceeded', remaining} end
    remaining = remaining - size
end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('HSET', KEYS[1], 'up:' .. ARGV[1], size)
redis.call('HINCRBY', KEYS[1], 'bytes', size)
redis.call('HINCRBY', KEYS[1], 'count', 1)
redis.call('ZADD', KEYS[2], ledger_now() + tonumber(ARGV[6]) + 1, ARGV[1])
ledger_keep(KEYS[1], KEYS[2])
return {'reserved', remaining}
"""
)


class ReserveOutcome(enum.StrEnum):
    RESERVED = "reserved"
    EXCEEDED = "exceeded"
    TOO_MANY = "too_many"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class Reservation:
    outcome: ReserveOutcome
    # Bytes still free after this upload (reserved; UNLIMITED without a quota), or before
    # it (exceeded); the uploads in progress (too many).
    remaining: int


class QuotaLedger:
    def __init__(self, db: Database, kv: KeyValueStore, *, unused_window: timedelta) -> None:
        self._db = db
        self._kv = kv
        self._unused_window = unused_window
        self._admit = kv.script(_ADMIT_LUA)

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

    async def finished_count(self, owner_id: str) -> str:
        """The ledger's ``gen``, to read before ``stored_bytes`` and hand to ``admit``."""
        return await self._kv.hget(ledger_key(owner_id), "gen") or "0"

    async def admit(
        self,
        owner_id: str,
        upload_id: str,
        *,
        size: int,
        state: Mapping[str, str],
        allowance: int,
        max_in_progress: int,
        ttl: float,
        finished_count: str | None,
    ) -> Reservation:
        """Stores ``state`` (the fields of ``upload_state_key(upload_id)``) and counts the
        upload among the owner's in progress, if there is room for one more and ``size``
        fits in ``allowance`` less the others'; stores nothing otherwise. With
        ``finished_count`` (from ``finished_count``, read before the database), refuses
        with RETRY when an upload finished since."""
        pairs = [item for field in state.items() for item in field]
        outcome, remaining = await self._admit(
            keys=[*ledger_keys(owner_id), upload_state_key(upload_id)],
            args=[
                upload_id,
                size,
                allowance,
                max_in_progress,
                "" if finished_count is None else finished_count,
                max(1, round(ttl * 1000)),
                *pairs,
            ],
        )
        return Reservation(ReserveOutcome(outcome), int(remaining))
