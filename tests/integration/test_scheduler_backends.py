"""Back ends for the scheduler's and the outbox's tests; no tests of its own.

``open_backends`` gives a test either the embedded back ends (SQLite in the test's folder,
in-process Redis and bus) or the real ones of ``real_backends_env`` (MariaDB, Redis,
RabbitMQ), and removes afterwards what the test made: its queues, its Redis namespace, and
on the shared MariaDB database the rows it wrote. ``Waiter`` lets a test wait for what
callbacks report, never on the clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import delete

from shared.blobs import BlobStore, open_blob_store
from shared.bus import Event, MessageBus, Outcome, open_bus
from shared.db import Database, open_database
from shared.db.schema import blobs, outbox, processed_messages
from shared.kv import KeyValueStore, open_kv
from shared.settings import Settings

# The embedded back ends, and the real ones (only where the servers answer).
BACKEND_KINDS = ["embedded", pytest.param("real", marks=pytest.mark.integration)]

# How long anything may take to happen before a test fails; a healthy run needs ms.
WAIT = 10.0


class Waiter:
    """Collects what a callback reports and lets a test wait for a condition on it."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


class Recorder(Waiter):
    """A bus handler and ``on_outcome`` that remember events and outcomes."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []
        self.outcomes: list[Outcome] = []

    async def handle(self, event: Event) -> None:
        self.events.append(event)
        self.add(event)

    def outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.add(outcome)

    def results(self, result: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == result]


@dataclass
class Backends:
    kind: str
    settings: Settings
    db: Database
    kv: KeyValueStore
    bus: MessageBus
    blobs: BlobStore
    # What the test made, removed at the end.
    queues: set[str] = field(default_factory=set)
    content_hashes: set[str] = field(default_factory=set)
    _extra_buses: list[MessageBus] = field(default_factory=list)

    def queue(self, name: str) -> str:
        """A queue name, remembered so that the queue is deleted after the test."""
        self.queues.add(name)
        return name

    async def open_bus(self) -> MessageBus:
        """Another connection to the same broker and namespace (another replica's)."""
        bus = await open_bus(self.settings.amqp_url, self.settings.namespace)
        self._extra_buses.append(bus)
        return bus


@asynccontextmanager
async def open_backends(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> AsyncIterator[Backends]:
    """The back ends of ``request.param`` (one of ``BACKEND_KINDS``), migrated and empty."""
    if request.param == "real":
        settings = make_settings(**request.getfixturevalue("real_backends_env"))
    else:
        settings = make_settings()
    db = await open_database(settings.db_url)
    await db.migrate()
    if db.dialect_name == "mysql":
        # One MariaDB database serves the whole run: start from an empty outbox.
        async with db.transaction() as conn:
            await conn.execute(delete(outbox))
    kv = await open_kv(settings.redis_url, settings.namespace)
    bus = await open_bus(settings.amqp_url, settings.namespace)
    backends = Backends(
        kind=str(request.param),
        settings=settings,
        db=db,
        kv=kv,
        bus=bus,
        blobs=open_blob_store(settings.blob_url),
    )
    try:
        yield backends
    finally:
        for extra in backends._extra_buses:
            await extra.close(grace=1.0)
        await bus.delete_namespace(backends.queues)
        await bus.close(grace=1.0)
        await kv.delete_namespace()
        await kv.close()
        if db.dialect_name == "mysql":
            async with db.transaction() as conn:
                await conn.execute(delete(outbox))
                if backends.queues:
                    await conn.execute(
                        delete(processed_messages).where(
                            processed_messages.c.consumer.in_(backends.queues)
                        )
                    )
                if backends.content_hashes:
                    await conn.execute(
                        delete(blobs).where(blobs.c.content_hash.in_(backends.content_hashes))
                    )
        await db.close()
        await backends.blobs.close()
