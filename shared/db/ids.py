"""Opaque, sortable ids for rows: ULID-shaped, with no dependency.

48 bits of Unix time in milliseconds then 80 random bits, written as 26 characters of
Crockford base32. Ids made in a later millisecond sort after earlier ones as plain strings,
so "newest first" and cursors can order by id; within one millisecond the order is random.
"""

from __future__ import annotations

import secrets
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_LENGTH = 26  # 130 bits of base32 hold the 128 bits, the top two always zero


def new_id() -> str:
    """A new 26-character id, e.g. ``01J9ZK3Q5W8X2M4N6P7R9S1T3V``."""
    value = (time.time_ns() // 1_000_000) << _RANDOM_BITS | secrets.randbits(_RANDOM_BITS)
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(_LENGTH)))
