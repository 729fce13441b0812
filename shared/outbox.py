"""The transactional outbox: events written in the same transaction as their cause.

A service calls ``add_event(conn, event)`` inside the ``Database.transaction()`` that
makes the change; either both commit or neither does. The scheduler's relay publishes
unsent rows with publisher confirms and stamps ``sent_at``, so a broker outage only
delays events, and a crash between publish and stamp only repeats one (consumers
deduplicate on the event id).

The relay polls (every half second by default). A producer that wants its event out
sooner calls ``nudge_relay(kv)`` after the transaction has committed::

    async with db.transaction() as conn:
        ...
        await add_event(conn, Event.new(VIDEO_DELETED, {...}))
    await nudge_relay(kv)
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy.ext.asyncio import AsyncConnection

from shared.bus import Event
from shared.db.schema import outbox
from shared.kv import KeyValueError, KeyValueStore

logger = logging.getLogger(__name__)

# The Redis pub/sub channel every relay listens on for "there is something new".
NUDGE_CHANNEL: Final = "outbox:nudge"


async def add_event(conn: AsyncConnection, event: Event) -> None:
    """Queue ``event`` for publication when (and only if) ``conn``'s transaction commits."""
    await conn.execute(
        outbox.insert().values(
            event_id=event.id,
            routing_key=event.type,
            payload=event.to_json().decode(),
            created_at=event.occurred_at,
        )
    )


async def nudge_relay(kv: KeyValueStore) -> None:
    """Wake the outbox relay now instead of at its next poll. Best effort: call it only
    after the commit (a relay woken earlier finds nothing), and a failure here costs no
    more than the poll interval, so it is logged, not raised."""
    try:
        await kv.publish(NUDGE_CHANNEL, "1")
    except KeyValueError as exc:
        logger.debug("outbox: could not nudge the relay: %s", exc)
