"""A tus upload in Redis: the native upload's hash, plus its offset and its segments.

A tus upload *is* an upload of the native API as far as everyone else is concerned: its
hash lives at ``upload_state_key(id)`` with the native fields (so the quota ledger counts
it, the api's ``POST /videos`` sees it in progress, the sweeper leaves its blobs alone
while it lives), with ``content_hash`` empty (tus announces none) and these fields added:

- ``protocol`` = ``tus``; ``offset``, the bytes stored so far; ``metadata``, the raw
  ``Upload-Metadata`` (echoed on HEAD); ``filetype`` when the client named one.

Beside it, ``<state key>:tus-segments`` lists the blob names of the segments in file
order (each PATCH stores one segment, of whatever length it carried). Every change that
reads before it writes is one Lua script: an append is recorded only at the offset it was
sent for, so of two PATCHes racing for one offset exactly one counts. Like the native
scripts, an append moves the upload's deadline in its owner's ledger of uploads in progress
and a termination takes it out (``stream_service.repositories.quota``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from shared.kv import KeyValueStore
from shared.layout import (
    upload_lock_key,
    upload_prefix,
    upload_received_key,
    upload_state_key,
)
from stream_service.repositories.quota import LEDGER_LUA, ledger_keys

# The native hash's encoding: both protocols share one layout.
from stream_service.repositories.upload_state import UploadState
from stream_service.repositories.upload_state import decode_state as decode_upload_state
from stream_service.repositories.upload_state import encode_state as encode_upload_state

TUS_PROTOCOL: Final = "tus"


def tus_segments_key(upload_id: str) -> str:
    """The Redis list of a tus upload's segment names, in file order."""
    return f"{upload_state_key(upload_id)}:tus-segments"


def segment_blob_key(upload_id: str, name: str) -> str:
    """Segments live with the native chunks, so the sweeper treats both alike."""
    return upload_prefix(upload_id) + name


class AppendOutcome(enum.StrEnum):
    APPENDED = "appended"
    MOVED = "moved"  # the upload's offset is not the one the bytes were sent for
    MISSING = "missing"
    COMPLETE = "complete"
    COMPLETING = "completing"


class TerminateOutcome(enum.StrEnum):
    DELETED = "deleted"
    MISSING = "missing"
    COMPLETE = "complete"
    COMPLETING = "completing"


@dataclass(frozen=True, slots=True, kw_only=True)
class TusUpload:
    upload: UploadState
    offset: int
    metadata: str
    filetype: str | None


# KEYS: state, segments, lock, ledger, due. ARGV: offset sent for, length, segment name,
# ttl_ms, expires_at, upload id.
_APPEND_LUA = (
    LEDGER_LUA
    + """
if redis.call('HGET', KEYS[1], 'protocol') ~= 'tus' then return {'missing', 0} end
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
if redis.call('HGET', KEYS[1], 'state') == 'complete' then return {'complete', offset} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'completing', offset} end
if offset ~= tonumber(ARGV[1]) then return {'moved', offset} end
offset = offset + tonumber(ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'offset', offset, 'expires_at', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
ledger_touch(KEYS[4], KEYS[5], ARGV[6], ARGV[4])
return {'appended', offset}
"""
)

# KEYS: segments.
_SEGMENTS_LUA = """
return redis.call('LRANGE', KEYS[1], 0, -1)
"""

# KEYS: state, received, lock, segments, ledger, due. ARGV: upload id.
_TERMINATE_LUA = (
    LEDGER_LUA
    + """
if redis.call('HGET', KEYS[1], 'protocol') ~= 'tus' then return 'missing' end
if redis.call('HGET', KEYS[1], 'state') == 'complete' then return 'complete' end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'completing' end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
ledger_release(KEYS[5], KEYS[6], ARGV[1])
return 'deleted'
"""
)


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class TusStateStore:
    def __init__(self, kv: KeyValueStore) -> None:
        self._kv = kv
        self._append = kv.script(_APPEND_LUA)
        self._segments = kv.script(_SEGMENTS_LUA)
        self._terminate = kv.script(_TERMINATE_LUA)

    @staticmethod
    def encode(upload: UploadState, *, metadata: str, filetype: str | None) -> dict[str, str]:
        """The fields of a new tus upload's hash (``UploadService.admit`` stores them)."""
        fields = encode_upload_state(upload)
        fields |= {"protocol": TUS_PROTOCOL, "offset": "0", "metadata": metadata}
        if filetype is not None:
            fields["filetype"] = filetype
        return fields

    async def load(self, upload_id: str) -> TusUpload | None:
        """The tus upload, or None if there is none in Redis (or it is a native one)."""
        fields = await self._kv.hgetall(upload_state_key(upload_id))
        if fields.get("protocol") != TUS_PROTOCOL:
            return None
        return TusUpload(
            upload=decode_upload_state(upload_id, fields),
            offset=int(fields["offset"]),
            metadata=fields.get("metadata", ""),
            filetype=fields.get("filetype"),
        )

    async def append(
        self,
        upload_id: str,
        *,
        owner_id: str,
        offset: int,
        length: int,
        segment: str,
        ttl: float,
        expires_at: datetime,
    ) -> tuple[AppendOutcome, int]:
        """Records ``segment`` (already stored) as the ``length`` bytes at ``offset``;
        the outcome and the upload's offset after it."""
        outcome, new_offset = await self._append(
            keys=[
                upload_state_key(upload_id),
                tus_segments_key(upload_id),
                upload_lock_key(upload_id),
                *ledger_keys(owner_id),
            ],
            args=[offset, length, segment, _milliseconds(ttl), expires_at.isoformat(), upload_id],
        )
        return AppendOutcome(outcome), int(new_offset or 0)

    async def segments(self, upload_id: str) -> list[str]:
        names = await self._segments(keys=[tus_segments_key(upload_id)])
        return [str(name) for name in names]

    async def forget_segments(self, upload_id: str) -> None:
        """Drops the list once the upload is complete (its blobs are dropped already)."""
        await self._kv.delete(tus_segments_key(upload_id))

    async def terminate(self, upload_id: str, *, owner_id: str) -> TerminateOutcome:
        """Removes the upload's state and takes it out of its owner's ledger."""
        outcome = await self._terminate(
            keys=[
                upload_state_key(upload_id),
                upload_received_key(upload_id),
                upload_lock_key(upload_id),
                tus_segments_key(upload_id),
                *ledger_keys(owner_id),
            ],
            args=[upload_id],
        )
        return TerminateOutcome(outcome)
