"""Anti-spam shared by comments and danmaku: per-user rate limits and blocked words."""

from __future__ import annotations

import math

from shared.errors import RateLimitedError
from shared.kv import KeyValueStore


class RateLimit:
    """At most ``count`` actions per subject (a user id, or a client address for sign-ups)
    in each fixed window of ``seconds``.

    One Redis counter per subject and window, created with the window's lifetime (the
    expiry is set only when the counter is new, so hits never slide the window): every
    replica counts against the same number. A refusal carries ``Retry-After`` and the
    rate-limit headers (the IETF draft's ``RateLimit-*``), so a client can back off.
    """

    def __init__(self, kv: KeyValueStore, *, action: str, count: int, seconds: float) -> None:
        self._kv = kv
        self._action = action
        self._count = count
        self._seconds = seconds

    async def hit(self, subject: str) -> None:
        """Counts one action; ``RateLimitedError`` (429, ``Retry-After``) past the limit."""
        key = f"ratelimit:{self._action}:{subject}"
        used = await self._kv.incr(key, ex=self._seconds)
        if used > self._count:
            left_ms = await self._kv.pttl(key)
            retry_after = max(1, math.ceil(left_ms / 1000)) if left_ms > 0 else 1
            raise RateLimitedError(
                f"At most {self._count} {self._action} per {self._seconds:g} s; slow down.",
                retry_after=retry_after,
                code=f"{self._action}_rate_limited",
                headers={
                    "RateLimit-Policy": f"{self._count};w={math.ceil(self._seconds)}",
                    "RateLimit-Limit": str(self._count),
                    "RateLimit-Remaining": "0",
                    "RateLimit-Reset": str(retry_after),
                },
            )


class BlockedWords:
    """Case-insensitive substring match against the configured list (``VOD_BLOCKED_WORDS``)."""

    def __init__(self, words: tuple[str, ...]) -> None:
        self._words = tuple(w.casefold() for w in words if w)

    def matches(self, text: str) -> bool:
        folded = text.casefold()
        return any(word in folded for word in self._words)
