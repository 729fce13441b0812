"""The transactional outbox: events written in the same transaction as their cause.

A service calls ``add_event(conn, event)`` inside the ``Database.transaction()`` that
makes the change; either both commit or neither does. The scheduler's relay publishes
unsent rows with publisher confirms and stamps ``sent_at``, so a broker outage only
delays events, and a crash between publish and stamp only repeats one (consumers
deduplicate on the event id).
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from shared.bus import Event
from shared.db.schema import outbox


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
