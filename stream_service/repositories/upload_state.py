"""Uploads in progress, in Redis (the layout is described in ``shared.layout``).

Every change that reads before it writes is one Lua script, so replicas racing on one
upload (two PUTs of the same chunk, two ``complete`` calls, a DELETE mid-upload, a PUT
landing as the state expires) each act on one consistent view:

- a chunk is recorded only while the upload exists, is not complete and is not being
  assembled; recording refreshes the TTL of the hash and the set;
- completion is a lease (``SET NX PX`` of a random token) taken only while the upload is
  not complete; the holder renews it while it works and marks the upload complete;
- a DELETE removes the state only while nobody holds the lease.

The owner's ledger of uploads in progress (``stream_service.repositories.quota``) changes
in the same scripts: a state is created only by the ledger's ``admit``, recording a chunk
moves the upload's deadline with its TTL, finishing and deleting take it out of the ledger.

Nothing here lives in process memory: any replica, or a restarted one, carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from shared.kv import KeyValueStore
from shared.layout import (
    upload_events_channel,
    upload_lock_key,
    upload_received_key,
    upload_state_key,
)
from stream_service.repositories.quota import LEDGER_LUA, ledger_keys

UPLOADING = "uploading"
COMPLETE = "complete"


class ChunkOutcome(enum.StrEnum):
    RECORDED = "recorded"
    MISSING = "missing"
    COMPLETE = "complete"
    COMPLETING = "completing"


class LeaseOutcome(enum.StrEnum):
    ACQUIRED = "acquired"
    MISSING = "missing"
    COMPLETE = "complete"
    BUSY = "busy"


class DeleteOutcome(enum.StrEnum):
    DELETED = "deleted"
    MISSING = "missing"
    COMPLETE = "complete"
    COMPLETING = "completing"


@dataclass(frozen=True, slots=True)
class Challenge:
    """The byte range an instant upload must hash to prove it has the file."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadState:
    id: str
    owner_id: str
    filename: str
    size: int
    chunk_size: int
    content_hash: str
    state: str
    created_at: datetime
    expires_at: datetime
    challenge: Challenge | None = None
    completed_at: datetime | None = None

    @property
    def total_chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    @property
    def instant(self) -> bool:
        return self.challenge is not None

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    def chunk_length(self, index: int) -> int:
        """How many bytes chunk ``index`` holds: ``chunk_size``, less for the last one."""
        return min(self.chunk_size, self.size - index * self.chunk_size)


# KEYS: state, received, lock, blocks, ledger, due. ARGV: index, ttl_ms, expires_at, block
# digests (hex, concatenated; empty when not known), upload id. The digests go in with the
# index, so a recorded index always has the digests of the bytes its blob holds.
_RECORD_CHUNK_LUA = (
    LEDGER_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if redis.call('HGET', KEYS[1], 'state') == 'complete' then return 'complete' end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'completing' end
redis.call('SADD', KEYS[2], ARGV[1])
if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
    redis.call('PEXPIRE', KEYS[4], ARGV[2])
end
redis.call('HSET', KEYS[1], 'expires_at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
ledger_touch(KEYS[5], KEYS[6], ARGV[5], ARGV[2])
return 'recorded'
"""
)

# KEYS: state, lock. ARGV: token, lease_ms.
_BEGIN_COMPLETION_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if redis.call('HGET', KEYS[1], 'state') == 'complete' then return 'complete' end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'acquired' end
return 'busy'
"""

# KEYS: lock. ARGV: token, lease_ms.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock. ARGV: token.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: state, received, lock, blocks, ledger, due. ARGV: completed_at, ttl_ms, token,
# upload id. Not conditional on the lease: the database already holds the finished upload,
# so marking it complete (and moving it out of the ledger) is right whoever holds the lock.
_FINISH_LUA = (
    LEDGER_LUA
    + """
ledger_finish(KEYS[5], KEYS[6], ARGV[4], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'complete')
redis.call('HSET', KEYS[1], 'completed_at', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2], KEYS[4])
if redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
return 1
"""
)

# KEYS: state, received, lock, blocks, ledger, due. ARGV: upload id.
_DELETE_LUA = (
    LEDGER_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if redis.call('HGET', KEYS[1], 'state') == 'complete' then return 'complete' end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'completing' end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
ledger_release(KEYS[5], KEYS[6], ARGV[1])
return 'deleted'
"""
)


_DIGEST_BYTES = 32


def _upload_blocks_key(upload_id: str) -> str:
    """The Redis hash of chunk index → its blocks' SHA-256 digests (hex, concatenated);
    it expires with the upload. Kept apart from the state hash, which every request reads
    whole."""
    return f"{upload_state_key(upload_id)}:blocks"


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def encode_state(upload: UploadState) -> dict[str, str]:
    fields = {
        "owner_id": upload.owner_id,
        "filename": upload.filename,
        "size": str(upload.size),
        "chunk_size": str(upload.chunk_size),
        # Derivable, but stored so that other readers (sweeper, admin) need no arithmetic.
        "total_chunks": str(upload.total_chunks),
        "content_hash": upload.content_hash,
        "state": upload.state,
        "created_at": upload.created_at.isoformat(),
        "expires_at": upload.expires_at.isoformat(),
        "instant": "1" if upload.challenge else "0",
    }
    if upload.challenge is not None:
        fields["challenge_offset"] = str(upload.challenge.offset)
        fields["challenge_length"] = str(upload.challenge.length)
    if upload.completed_at is not None:
        fields["completed_at"] = upload.completed_at.isoformat()
    return fields


def decode_state(upload_id: str, fields: dict[str, str]) -> UploadState:
    challenge = None
    if fields.get("instant") == "1":
        challenge = Challenge(int(fields["challenge_offset"]), int(fields["challenge_length"]))
    completed_at = fields.get("completed_at")
    return UploadState(
        id=upload_id,
        owner_id=fields["owner_id"],
        filename=fields["filename"],
        size=int(fields["size"]),
        chunk_size=int(fields["chunk_size"]),
        content_hash=fields["content_hash"],
        state=fields["state"],
        created_at=datetime.fromisoformat(fields["created_at"]),
        expires_at=datetime.fromisoformat(fields["expires_at"]),
        challenge=challenge,
        completed_at=datetime.fromisoformat(completed_at) if completed_at else None,
    )


class CompletionNotices:
    """Messages on an upload's events channel, awaited with a timeout.

    One pending read survives a timed-out wait (cancelling it would end the
    subscription's iterator), so a caller can wait, look, and wait again.
    """

    def __init__(self, messages: AsyncIterator[str]) -> None:
        self._messages = messages
        self._next: asyncio.Task[str] | None = None

    async def wait(self, within: float) -> None:
        """Returns at the next notice, or after ``within`` seconds without one."""
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._messages))
        done, _ = await asyncio.wait({self._next}, timeout=within)
        if done:
            self._next = None
            # A closed subscription ends the wait as a notice would: the caller looks again.
            with contextlib.suppress(StopAsyncIteration):
                done.pop().result()

    async def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await self._next


class UploadStateStore:
    """Upload state in Redis; see the module docstring for what each step guarantees."""

    def __init__(self, kv: KeyValueStore) -> None:
        self._kv = kv
        self._record_chunk = kv.script(_RECORD_CHUNK_LUA)
        self._begin_completion = kv.script(_BEGIN_COMPLETION_LUA)
        self._renew = kv.script(_RENEW_LUA)
        self._release = kv.script(_RELEASE_LUA)
        self._finish = kv.script(_FINISH_LUA)
        self._delete = kv.script(_DELETE_LUA)

    async def load(self, upload_id: str) -> UploadState | None:
        fields = await self._kv.hgetall(upload_state_key(upload_id))
        return decode_state(upload_id, fields) if fields else None

    async def received(self, upload_id: str) -> set[int]:
        return {int(index) for index in await self._kv.smembers(upload_received_key(upload_id))}

    async def is_received(self, upload_id: str, index: int) -> bool:
        return await self._kv.sismember(upload_received_key(upload_id), str(index))

    async def forget_chunks(self, upload_id: str, indices: list[int]) -> None:
        """Takes ``indices`` out of the received set (their blobs were lost)."""
        if indices:
            await self._kv.srem(upload_received_key(upload_id), *indices)
            await self._kv.hdel(_upload_blocks_key(upload_id), *map(str, indices))

    async def is_completing(self, upload_id: str) -> bool:
        return await self._kv.exists(upload_lock_key(upload_id))

    async def record_chunk(
        self,
        upload_id: str,
        index: int,
        *,
        owner_id: str,
        ttl: float,
        expires_at: datetime,
        block_digests: Sequence[bytes] = (),
    ) -> ChunkOutcome:
        """Adds ``index`` to the received set (its blob must already be stored), with the
        raw SHA-256 of each 4 MiB block of the chunk when known."""
        outcome = await self._record_chunk(
            keys=self._keys(upload_id, owner_id),
            args=[
                index,
                _milliseconds(ttl),
                expires_at.isoformat(),
                b"".join(block_digests).hex(),
                upload_id,
            ],
        )
        return ChunkOutcome(outcome)

    async def block_digests(self, upload_id: str) -> dict[int, list[bytes]]:
        """The block digests recorded with each received chunk (chunks recorded without
        them are absent)."""
        fields = await self._kv.hgetall(_upload_blocks_key(upload_id))
        return {
            int(index): [
                bytes.fromhex(hexes[start : start + 2 * _DIGEST_BYTES])
                for start in range(0, len(hexes), 2 * _DIGEST_BYTES)
            ]
            for index, hexes in fields.items()
        }

    async def begin_completion(self, upload_id: str, token: str, *, lease: float) -> LeaseOutcome:
        outcome = await self._begin_completion(
            keys=[upload_state_key(upload_id), upload_lock_key(upload_id)],
            args=[token, _milliseconds(lease)],
        )
        return LeaseOutcome(outcome)

    async def renew(self, upload_id: str, token: str, *, lease: float) -> bool:
        """Extends the lease; False when ``token`` no longer holds it."""
        renewed = await self._renew(
            keys=[upload_lock_key(upload_id)], args=[token, _milliseconds(lease)]
        )
        return bool(renewed)

    async def release(self, upload_id: str, token: str) -> None:
        """Gives the lease up if ``token`` still holds it (a no-op after ``finish``)."""
        await self._release(keys=[upload_lock_key(upload_id)], args=[token])

    async def finish(
        self, upload_id: str, token: str, *, owner_id: str, completed_at: datetime, ttl: float
    ) -> None:
        """Marks the upload complete, drops its received set and the lease, and moves it
        out of its owner's ledger (the database counts it now)."""
        await self._finish(
            keys=self._keys(upload_id, owner_id),
            args=[completed_at.isoformat(), _milliseconds(ttl), token, upload_id],
        )

    async def delete(self, upload_id: str, *, owner_id: str) -> DeleteOutcome:
        """Removes the upload's state and takes it out of its owner's ledger."""
        outcome = await self._delete(keys=self._keys(upload_id, owner_id), args=[upload_id])
        return DeleteOutcome(outcome)

    async def announce(self, upload_id: str) -> None:
        """Tells callers waiting on this upload that a completion attempt has ended."""
        await self._kv.publish(upload_events_channel(upload_id), "completion-ended")

    @contextlib.asynccontextmanager
    async def notices(self, upload_id: str) -> AsyncIterator[CompletionNotices]:
        async with self._kv.subscribe(upload_events_channel(upload_id)) as messages:
            notices = CompletionNotices(messages)
            try:
                yield notices
            finally:
                await notices.close()

    @staticmethod
    def _keys(upload_id: str, owner_id: str) -> list[str]:
        return [
            upload_state_key(upload_id),
            upload_received_key(upload_id),
            upload_lock_key(upload_id),
            _upload_blocks_key(upload_id),
            *ledger_keys(owner_id),
        ]
