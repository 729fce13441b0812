"""Instant-upload challenges, one per user and content, and the wrong proofs sent for them.

A challenge names the byte range whose SHA-256 proves that the caller has a stored file.
If every new upload drew a new range, a caller who knows part of a file (its header, a
public excerpt) could create uploads until a range lands on what they know; and if proofs
could be retried without end, a small range could be guessed. So the range is drawn once
per user and content hash (``challenge_key``) and kept while that user keeps creating
uploads of it (each creation keeps it at least a state TTL longer), and the wrong proofs
are counted there: after ``limit`` of them, proofs are refused until it expires, and the
file must be sent the long way.

An attempt is counted before its proof is checked and given back if the proof was right
(or could not be checked), so proofs sent concurrently cannot overshoot the limit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shared.kv import KeyValueStore
from stream_service.repositories.upload_state import Challenge


def challenge_key(owner_id: str, content_hash: str) -> str:
    """The Redis hash of one user's challenge for one content: offset, length, failures."""
    return f"upload_challenge:{owner_id}:{content_hash}"


# KEYS: challenge. ARGV: offset, length (a fresh draw, used only if there is none), ttl_ms.
_ISSUE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], 'offset', ARGV[1], 'length', ARGV[2], 'failures', 0)
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return redis.call('HMGET', KEYS[1], 'offset', 'length')
"""

# KEYS: challenge. ARGV: limit, offset, length (the upload's, should the hash have gone
# while its upload lives on), ttl_ms.
_ATTEMPT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], 'offset', ARGV[2], 'length', ARGV[3], 'failures', 0)
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
if tonumber(redis.call('HGET', KEYS[1], 'failures')) >= tonumber(ARGV[1]) then
    return {'refused', redis.call('PTTL', KEYS[1])}
end
redis.call('HINCRBY', KEYS[1], 'failures', 1)
return {'counted', redis.call('PTTL', KEYS[1])}
"""

# KEYS: challenge.
_GIVE_BACK_LUA = """
if tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') > 0 then
    redis.call('HINCRBY', KEYS[1], 'failures', -1)
end
return 1
"""


class AttemptOutcome(enum.StrEnum):
    COUNTED = "counted"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Attempt:
    outcome: AttemptOutcome
    # Milliseconds until the challenge (and its count of wrong proofs) expires.
    expires_in_ms: int


class ChallengeStore:
    def __init__(self, kv: KeyValueStore) -> None:
        self._issue = kv.script(_ISSUE_LUA)
        self._attempt = kv.script(_ATTEMPT_LUA)
        self._give_back = kv.script(_GIVE_BACK_LUA)

    async def issue(
        self, owner_id: str, content_hash: str, *, fresh: Challenge, ttl: float
    ) -> Challenge:
        """The user's challenge for the content: the one they were given before if it
        still lives, else ``fresh``; kept at least ``ttl`` seconds from now."""
        offset, length = await self._issue(
            keys=[challenge_key(owner_id, content_hash)],
            args=[fresh.offset, fresh.length, max(1, round(ttl * 1000))],
        )
        return Challenge(offset=int(offset), length=int(length))

    async def attempt(
        self, owner_id: str, content_hash: str, challenge: Challenge, *, limit: int, ttl: float
    ) -> Attempt:
        """Counts a proof about to be checked as wrong, unless ``limit`` are counted."""
        outcome, expires_in = await self._attempt(
            keys=[challenge_key(owner_id, content_hash)],
            args=[limit, challenge.offset, challenge.length, max(1, round(ttl * 1000))],
        )
        return Attempt(AttemptOutcome(outcome), int(expires_in))

    async def give_back(self, owner_id: str, content_hash: str) -> None:
        """Uncounts an attempt whose proof was right or could not be checked."""
        await self._give_back(keys=[challenge_key(owner_id, content_hash)])
