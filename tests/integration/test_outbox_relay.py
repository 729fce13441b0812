"""The outbox relay, on the embedded back ends and on MariaDB + Redis + RabbitMQ.

Events are written with ``shared.outbox.add_event`` as a producing service would, and
read back from a probe queue bound to their routing keys. Tests wait on what the relay
reports (``on_batch``) and what the probe receives, never on the clock; the relay's poll
and back-off intervals are a few tens of milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from scheduler_service.jobs.lease import Lease
from scheduler_service.jobs.outbox_relay import (
    LEASE_NAME,
    OutboxRelay,
    RawPublisher,
    RelayError,
    RelayReport,
)
from shared.bus import BusUnavailableError, Event
from shared.db.schema import outbox
from shared.outbox import add_event, nudge_relay
from shared.settings import Settings
from tests.integration.test_scheduler_backends import (
    BACKEND_KINDS,
    WAIT,
    Backends,
    Recorder,
    Waiter,
    open_backends,
)

FAST = {"poll_interval": 0.02, "backoff_max": 0.05, "lease_ttl": 5.0}


@pytest.fixture(params=BACKEND_KINDS)
async def backends(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> AsyncIterator[Backends]:
    async with open_backends(request, make_settings) as opened:
        yield opened


@pytest.fixture
async def probe(backends: Backends) -> Recorder:
    """Receives every ``relay.*`` event published in the test's namespace."""
    recorder = Recorder()
    await backends.bus.subscribe(
        backends.queue("relay-probe"), ["relay.#"], recorder.handle, prefetch=1
    )
    return recorder


class FlakyPublisher:
    """A bus in front of the real one that fails on demand, like a broker outage."""

    def __init__(self, bus: RawPublisher, *, down: bool = False) -> None:
        self._bus = bus
        self.down = down
        self.refuse: set[str] = set()  # routing keys refused with a non-outage error
        self.failures = Waiter()

    async def publish_raw(
        self, routing_key: str, body: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        if self.down:
            self.failures.add(routing_key)
            raise BusUnavailableError("publish: the broker is down (test)")
        if routing_key in self.refuse:
            self.failures.add(routing_key)
            raise RuntimeError(f"refused {routing_key} (test)")
        await self._bus.publish_raw(routing_key, body, headers=headers)


class Relays:
    """Relays run as background tasks, with what each reported, stopped at the end."""

    def __init__(self, backends: Backends) -> None:
        self._backends = backends
        self.reports = Waiter()
        self._tasks: dict[OutboxRelay, asyncio.Task[None]] = {}
        self.sent_by: dict[str, list[str]] = {}

    def make(self, owner: str = "a", bus: RawPublisher | None = None, **kwargs: Any) -> OutboxRelay:
        sent = self.sent_by.setdefault(owner, [])

        def on_batch(report: RelayReport) -> None:
            sent.extend(report.sent)
            self.reports.add(report)

        return OutboxRelay(
            self._backends.db,
            bus or self._backends.bus,
            self._backends.kv,
            owner=owner,
            on_batch=on_batch,
            **{**FAST, **kwargs},
        )

    def start(self, relay: OutboxRelay) -> OutboxRelay:
        self._tasks[relay] = asyncio.create_task(relay.run(), name="test:relay")
        return relay

    async def stop(self, relay: OutboxRelay) -> None:
        task = self._tasks.pop(relay)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def stop_all(self) -> None:
        for relay in list(self._tasks):
            await self.stop(relay)

    @property
    def sent(self) -> list[str]:
        return [event_id for ids in self.sent_by.values() for event_id in ids]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.reports.items if r.error is not None]


@pytest.fixture
async def relays(backends: Backends) -> AsyncIterator[Relays]:
    started = Relays(backends)
    yield started
    await started.stop_all()


async def write(backends: Backends, *events: Event) -> None:
    """Commit ``events`` to the outbox in one transaction, as a producer does."""
    async with backends.db.transaction() as conn:
        for event in events:
            await add_event(conn, event)


async def rows(backends: Backends) -> dict[str, tuple[datetime | None, int]]:
    """event id -> (sent_at, attempts) of every outbox row."""
    async with backends.db.connect() as conn:
        result = await conn.execute(
            select(outbox.c.event_id, outbox.c.sent_at, outbox.c.attempts).order_by(outbox.c.id)
        )
        return {r.event_id: (r.sent_at, r.attempts) for r in result}


def events(count: int, key: str = "relay.test") -> list[Event]:
    return [Event.new(key, {"n": n}) for n in range(count)]


async def test_relay_publishes_committed_events_in_order_and_stamps_them(
    backends: Backends, probe: Recorder, relays: Relays
) -> None:
    written = events(5)
    for event in written[:2]:
        await write(backends, event)
    await write(backends, *written[2:])
    before = datetime.now(UTC)

    relays.start(relays.make())
    await probe.until(lambda: len(probe.events) == 5)
    await relays.reports.until(lambda: len(relays.sent) == 5)

    # The exact body went out, and in the order the rows were written.
    assert probe.events == written
    stored = await rows(backends)
    assert list(stored) == [e.id for e in written]
    for sent_at, attempts in stored.values():
        assert sent_at is not None
        assert sent_at >= before - timedelta(seconds=1)
        assert attempts == 1


async def test_an_event_of_a_rolled_back_transaction_is_never_published(
    backends: Backends, probe: Recorder, relays: Relays
) -> None:
    rolled_back, committed = events(2)

    async def change_that_fails() -> None:
        async with backends.db.transaction() as conn:
            await add_event(conn, rolled_back)
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError, match="the change failed"):
        await change_that_fails()
    await write(backends, committed)

    assert await relays.make().drain() == 1
    await probe.until(lambda: len(probe.events) == 1)
    assert probe.events == [committed]
    assert list(await rows(backends)) == [committed.id]


async def test_a_broker_outage_delays_events_and_loses_none(
    backends: Backends, probe: Recorder, relays: Relays
) -> None:
    flaky = FlakyPublisher(backends.bus, down=True)
    written = events(3)
    await write(backends, *written)

    relays.start(relays.make(bus=flaky))
    # Several failed passes: the relay backs off and tries again, it does not give up.
    await relays.reports.until(lambda: len(relays.errors) >= 3)

    stored = await rows(backends)
    assert all(sent_at is None for sent_at, _ in stored.values())
    # A pass stops at the row that failed; the rows behind it were not even tried.
    assert stored[written[0].id][1] >= 3
    assert stored[written[1].id][1] == stored[written[2].id][1] == 0
    assert probe.events == []

    flaky.down = False
    await probe.until(lambda: len(probe.events) == 3)
    await relays.reports.until(lambda: len(relays.sent) == 3)

    assert probe.events == written
    stored = await rows(backends)
    assert all(sent_at is not None for sent_at, _ in stored.values())
    assert stored[written[0].id][1] == len(flaky.failures.items) + 1


async def test_a_refused_event_does_not_hold_up_the_others(
    backends: Backends, probe: Recorder, relays: Relays
) -> None:
    flaky = FlakyPublisher(backends.bus)
    flaky.refuse.add("relay.poison")
    poison = Event.new("relay.poison", {})
    good = events(2)
    await write(backends, poison, *good)

    with pytest.raises(RelayError, match=r"refused relay\.poison"):
        await relays.make(bus=flaky).drain()

    await probe.until(lambda: len(probe.events) == 2)
    assert probe.events == good
    stored = await rows(backends)
    assert stored[poison.id] == (None, 1)
    assert all(stored[e.id][0] is not None for e in good)


async def test_two_relays_publish_each_event_exactly_once(
    backends: Backends, probe: Recorder, relays: Relays
) -> None:
    # Two replicas: each with its own lease token and its own broker connection.
    buses = {"a": backends.bus, "b": await backends.open_bus()}
    for owner, bus in buses.items():
        relays.start(relays.make(owner, bus=bus))
    written = events(30)
    for chunk in range(0, 30, 5):
        await write(backends, *written[chunk : chunk + 5])
    await relays.reports.until(lambda: len(relays.sent) >= 30)

    # Once they are stopped nothing more can come: an end marker published afterwards on
    # the leader's connection arrives after everything the leader sent through it.
    leader = "a" if relays.sent_by["a"] else "b"
    await relays.stop_all()
    marker = Event.new("relay.end", {})
    await buses[leader].publish(marker)
    await probe.until(lambda: marker in probe.events)

    received = [e.id for e in probe.events if e != marker]
    assert sorted(received) == sorted(e.id for e in written)
    assert len(received) == len(set(received))
    # One replica relayed everything, in order; the other stood by.
    assert relays.sent_by[leader] == [e.id for e in written]
    assert relays.sent_by["b" if leader == "a" else "a"] == []


async def test_a_standby_relay_takes_over_when_the_leader_stops(
    backends: Backends, probe: Recorder, relays: Relays
) -> None:
    first_event, second_event = events(2)
    await write(backends, first_event)
    leader = relays.start(relays.make("a"))
    await relays.reports.until(lambda: first_event.id in relays.sent)
    standby = relays.start(relays.make("b"))
    assert leader.leading
    assert not standby.leading

    # A clean stop releases the lease at once: the standby need not wait for it to expire.
    await relays.stop(leader)
    holder = await Lease(backends.kv, LEASE_NAME, ttl=1).holder()
    assert holder is None or holder.startswith("b:")
    await write(backends, second_event)
    await relays.reports.until(lambda: second_event.id in relays.sent)

    assert relays.sent_by == {"a": [first_event.id], "b": [second_event.id]}
    await probe.until(lambda: len(probe.events) == 2)
    assert probe.events == [first_event, second_event]


async def test_a_nudge_wakes_the_relay_before_its_next_poll(
    backends: Backends, probe: Recorder, relays: Relays
) -> None:
    early, nudged = events(2)
    await write(backends, early)
    # A poll far longer than the test may take: only the nudge can bring the event out.
    relay = relays.start(relays.make(poll_interval=600.0))
    await relays.reports.until(lambda: early.id in relays.sent)
    await asyncio.wait_for(relay.listening.wait(), WAIT)

    await write(backends, nudged)
    await nudge_relay(backends.kv)

    await probe.until(lambda: nudged in probe.events)
    await relays.reports.until(lambda: nudged.id in relays.sent)


async def test_sent_rows_are_purged_after_the_retention_period(
    backends: Backends, relays: Relays
) -> None:
    relay = relays.make(retention=timedelta(days=7))
    sent = events(3)
    await write(backends, *sent)
    assert await relay.drain() == 3
    unsent = Event.new("relay.later", {})
    await write(backends, unsent)

    assert await relay.purge_sent() == 0
    assert await relay.purge_sent(datetime.now(UTC) + timedelta(days=7, minutes=1)) == 3
    assert list(await rows(backends)) == [unsent.id]


async def test_a_crashed_leaders_lease_holds_the_relay_back_until_it_expires(
    backends: Backends, probe: Recorder, relays: Relays
) -> None:
    # A replica took the lease and died: nobody renews or releases it.
    crashed = Lease(backends.kv, LEASE_NAME, ttl=0.3, owner="crashed")
    assert await crashed.acquire()
    loop = asyncio.get_running_loop()
    taken = loop.time()
    event = events(1)[0]
    await write(backends, event)

    relay = relays.start(relays.make("a"))
    await probe.until(lambda: probe.events == [event])

    assert loop.time() - taken >= 0.25
    assert relay.leading
    # The dead replica, were it to wake up, cannot release the lease it lost.
    assert not await crashed.release()
    holder = await crashed.holder()
    assert holder is not None
    assert holder.startswith("a:")
