"""Danmaku storage: Redis first (readable at once), the database behind it.

Redis keeps one sorted set per video and 6-minute segment of the video's timeline
(``danmaku:<video>:<bucket>``, member = the danmaku's public JSON, score = its offset), so
a window read touches only the buckets it spans, in one round trip (a Lua script).

A bucket is *complete* in Redis once it has been filled from the database: a marker
member (score -1, below every offset) says so. A write to an incomplete bucket still adds
its danmaku (it is readable at once), and a read of an incomplete bucket loads the whole
bucket from the database (rows the scheduler has persisted), merges what Redis holds
(danmaku not persisted yet), fills Redis and sets the marker. The marker lives inside
the set, so expiry or eviction drops both together: a bucket is never marked complete
with its members gone. Buckets expire ``BUCKET_TTL`` after their last read or write.

Hidden danmaku (blocked words) never reach Redis; the database keeps them with
``hidden = 1`` and every read here leaves them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from sqlalchemy import select

from shared.db import Database
from shared.db.schema import danmaku, users
from shared.kv import KeyValueStore
from shared.layout import DANMAKU_BUCKET_MS, danmaku_bucket_key, danmaku_bucket_of

BUCKET_MS: Final = DANMAKU_BUCKET_MS
BUCKET_TTL_SECONDS: Final = 24 * 60 * 60
# Most danmaku one bucket load reads from the database (and one window returns).
MAX_BUCKET_ITEMS: Final = 10_000
_LOADED: Final = "\x00loaded"

# KEYS: bucket keys. ARGV: from, to, limit, ttl ms. Returns, per key, {complete, members}.
_READ_WINDOW = """
local out = {}
for i, key in ipairs(KEYS) do
  local complete = redis.call('ZSCORE', key, ARGV[5]) and 1 or 0
  local members = redis.call('ZRANGEBYSCORE', key, ARGV[1], ARGV[2], 'LIMIT', 0, ARGV[3])
  if redis.call('EXISTS', key) == 1 then
    redis.call('PEXPIRE', key, ARGV[4])
  end
  out[i] = {complete, members}
end
return out
"""

# KEYS[1]: a bucket. ARGV: ttl ms, score, member.
_ADD = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1]: a bucket. ARGV: ttl ms, marker, then score, member pairs.
_FILL = """
redis.call('ZADD', KEYS[1], -1, ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


# The key layout is shared with the scheduler, which removes a deleted video's buckets.
bucket_of = danmaku_bucket_of
bucket_key = danmaku_bucket_key


def encode_member(item: dict[str, Any]) -> str:
    return orjson.dumps(item).decode()


@dataclass(frozen=True, slots=True)
class Window:
    items: list[dict[str, Any]]
    buckets_from_database: int


class DanmakuRepository:
    def __init__(self, db: Database, kv: KeyValueStore) -> None:
        self._db = db
        self._kv = kv
        self._read = kv.script(_READ_WINDOW)
        self._add = kv.script(_ADD)
        self._fill = kv.script(_FILL)
        self._ttl_ms = BUCKET_TTL_SECONDS * 1000

    async def add(self, video_id: str, item: dict[str, Any]) -> None:
        """Make a shown danmaku readable (``item`` is its public JSON)."""
        offset = int(item["offset_ms"])
        await self._add(
            keys=[bucket_key(video_id, bucket_of(offset))],
            args=[self._ttl_ms, offset, encode_member(item)],
        )

    async def remove(self, video_id: str, item: dict[str, Any]) -> None:
        await self._kv.zrem(
            bucket_key(video_id, bucket_of(int(item["offset_ms"]))), encode_member(item)
        )

    async def window(self, video_id: str, from_ms: int, to_ms: int) -> Window:
        """Shown danmaku with ``from_ms <= offset <= to_ms``, by offset (at most
        ``MAX_BUCKET_ITEMS``)."""
        buckets = list(range(bucket_of(from_ms), bucket_of(to_ms) + 1))
        keys = [bucket_key(video_id, b) for b in buckets]
        answers = await self._read(
            keys=keys, args=[from_ms, to_ms, MAX_BUCKET_ITEMS, self._ttl_ms, _LOADED]
        )
        found: dict[str, dict[str, Any]] = {}
        from_database = 0
        for bucket, (complete, cached) in zip(buckets, answers, strict=True):
            members = cached
            if not complete:
                from_database += 1
                members = await self._load_bucket(video_id, bucket)
            for member in members:
                item = orjson.loads(member)
                if from_ms <= item["offset_ms"] <= to_ms:
                    found[item["id"]] = item  # a bucket may hold one danmaku twice
        items = sorted(found.values(), key=lambda i: (i["offset_ms"], i["id"]))
        return Window(items=items[:MAX_BUCKET_ITEMS], buckets_from_database=from_database)

    async def _load_bucket(self, video_id: str, bucket: int) -> Sequence[str]:
        """Fill one bucket from the database; returns every member it now holds."""
        start = bucket * BUCKET_MS
        statement = (
            select(danmaku, users.c.username)
            .join(users, users.c.id == danmaku.c.author_id)
            .where(
                danmaku.c.video_id == video_id,
                danmaku.c.offset_ms >= start,
                danmaku.c.offset_ms < start + BUCKET_MS,
                danmaku.c.hidden.is_(False),
            )
            .order_by(danmaku.c.offset_ms)
            .limit(MAX_BUCKET_ITEMS + 1)
        )
        async with self._db.connect() as conn:
            rows = (await conn.execute(statement)).mappings().all()
        members = [
            encode_member(
                {
                    "id": row["id"],
                    "offset_ms": int(row["offset_ms"]),
                    "content": row["content"],
                    "mode": row["mode"],
                    "color": row["color"],
                    "author": {"id": row["author_id"], "username": row["username"]},
                    "created_at": row["created_at"].isoformat(),
                }
            )
            for row in rows[:MAX_BUCKET_ITEMS]
        ]
        key = bucket_key(video_id, bucket)
        args: list[str | int] = [self._ttl_ms, _LOADED]
        for member, row in zip(members, rows, strict=False):
            args += [int(row["offset_ms"]), member]
        if len(rows) > MAX_BUCKET_ITEMS:
            # Too many to hold complete: answer from the database without the marker.
            return members
        await self._fill(keys=[key], args=args)
        # What Redis held already (danmaku the scheduler has not persisted yet) joins in.
        return members + await self._kv.zrangebyscore(key, start, start + BUCKET_MS - 1)
