"""The consumer framework, on the embedded back ends and on MariaDB + RabbitMQ.

The handlers' work is a real database change, a ``blobs`` row's ``ref_count`` going up by
one per run, so "done once" is read from the database, not from the handler's memory.
Retry delays are tens of milliseconds; tests wait on the bus's outcomes.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_service.consumers.base import (
    ConsumerGroup,
    PermanentError,
    record_processed,
    record_processed_batch,
)
from scheduler_service.consumers.danmaku import DanmakuBatcher
from scheduler_service.metrics import SchedulerMetrics
from shared.bus import Event
from shared.db import new_id
from shared.db.schema import blobs, danmaku, processed_messages, users, videos
from shared.events import DANMAKU_CREATED
from shared.settings import Settings
from tests.integration.test_scheduler_backends import (
    BACKEND_KINDS,
    WAIT,
    Backends,
    Recorder,
    open_backends,
)
from tests.rows import add_video

FAST_RETRY = (0.02, 0.05)


@pytest.fixture(params=BACKEND_KINDS)
async def backends(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> AsyncIterator[Backends]:
    async with open_backends(request, make_settings) as opened:
        yield opened


@dataclass
class Consumers:
    group: ConsumerGroup
    recorder: Recorder
    metrics: SchedulerMetrics


@pytest.fixture
async def consumers(backends: Backends) -> AsyncIterator[Consumers]:
    """A consumer group with metrics of its own, reporting outcomes; closed at the end."""
    recorder = Recorder()
    metrics = SchedulerMetrics()
    group = ConsumerGroup(backends.db, backends.bus, metrics=metrics, on_outcome=recorder.outcome)
    yield Consumers(group, recorder, metrics)
    await group.close(grace=1.0)


class Counter:
    """A handler whose work is one ``ref_count`` increment of a blobs row of its own."""

    def __init__(self, backends: Backends, fail: Callable[[int], Exception | None]) -> None:
        self.content_hash = secrets.token_hex(32)
        backends.content_hashes.add(self.content_hash)
        self.runs = 0
        self._backends = backends
        self._fail = fail

    async def create(self) -> None:
        async with self._backends.db.transaction() as conn:
            await conn.execute(
                blobs.insert().values(
                    content_hash=self.content_hash, size=1, ref_count=0, created_at=_now()
                )
            )

    async def handle(self, conn: AsyncConnection, _event: Event) -> None:
        self.runs += 1
        await conn.execute(
            update(blobs)
            .where(blobs.c.content_hash == self.content_hash)
            .values(ref_count=blobs.c.ref_count + 1)
        )
        error = self._fail(self.runs)
        if error is not None:
            raise error

    async def count(self) -> int:
        async with self._backends.db.connect() as conn:
            value = await conn.scalar(
                select(blobs.c.ref_count).where(blobs.c.content_hash == self.content_hash)
            )
        assert value is not None
        return int(value)


async def counter(backends: Backends, fail: Callable[[int], Exception | None]) -> Counter:
    made = Counter(backends, fail)
    await made.create()
    return made


def _now() -> datetime:
    return datetime.now(UTC)


async def processed(backends: Backends, consumer: str, message_id: str) -> int:
    async with backends.db.connect() as conn:
        value = await conn.scalar(
            select(func.count())
            .select_from(processed_messages)
            .where(
                processed_messages.c.consumer == consumer,
                processed_messages.c.message_id == message_id,
            )
        )
    return int(value or 0)


def sample(metrics: SchedulerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_a_redelivered_message_is_handled_once(
    backends: Backends, consumers: Consumers
) -> None:
    work = await counter(backends, lambda _: None)
    queue = backends.queue("once")
    consumers.group.register(queue, ["job.once"], work.handle, retry_delays=FAST_RETRY)
    await consumers.group.start()
    event = Event.new("job.once", {})

    # The same message twice: what a relay that crashed before its stamp does.
    await backends.bus.publish(event)
    await backends.bus.publish(event)
    await consumers.recorder.until(lambda: len(consumers.recorder.results("acked")) == 2)

    assert work.runs == 1
    assert await work.count() == 1
    assert await processed(backends, queue, event.id) == 1
    metrics = consumers.metrics
    assert sample(metrics, "vod_scheduler_duplicate_messages_total", queue=queue) == 1
    assert sample(metrics, "vod_scheduler_messages_total", queue=queue, result="acked") == 2


async def test_a_failed_run_leaves_no_trace_and_the_retry_does_the_work(
    backends: Backends, consumers: Consumers
) -> None:
    recorder = consumers.recorder
    # The work is done, then the handler fails: the increment must roll back with it.
    work = await counter(backends, lambda run: RuntimeError("flaky") if run < 3 else None)
    queue = backends.queue("flaky")
    consumers.group.register(queue, ["job.flaky"], work.handle, retry_delays=FAST_RETRY)
    await consumers.group.start()
    event = Event.new("job.flaky", {})

    await backends.bus.publish(event)
    await recorder.until(lambda: bool(recorder.results("acked")))

    assert [(o.result, o.attempt) for o in recorder.outcomes] == [
        ("retried", 1),
        ("retried", 2),
        ("acked", 3),
    ]
    assert work.runs == 3
    assert await work.count() == 1
    assert await processed(backends, queue, event.id) == 1
    assert await backends.bus.parked(queue) == []


async def test_a_permanent_failure_is_parked_at_once(
    backends: Backends, consumers: Consumers
) -> None:
    recorder = consumers.recorder
    work = await counter(backends, lambda _: PermanentError("cannot decode the file"))
    queue = backends.queue("doomed")
    consumers.group.register(
        queue, ["job.doomed"], work.handle, max_attempts=5, retry_delays=FAST_RETRY
    )
    await consumers.group.start()
    event = Event.new("job.doomed", {})

    await backends.bus.publish(event)
    await recorder.until(lambda: bool(recorder.results("parked")))

    assert [(o.result, o.attempt) for o in recorder.outcomes] == [("parked", 1)]
    assert work.runs == 1
    [parked] = await backends.bus.parked_messages(queue)
    assert parked.event == event
    assert parked.error == "PermanentError: cannot decode the file"
    # Nothing of the failed run stays, so requeueing it later runs it afresh.
    assert await work.count() == 0
    assert await processed(backends, queue, event.id) == 0


async def test_metrics_count_outcomes_and_queue_depths(
    backends: Backends, consumers: Consumers
) -> None:
    recorder, metrics = consumers.recorder, consumers.metrics
    gate = asyncio.Event()
    started = asyncio.Event()

    async def handle(_conn: AsyncConnection, event: Event) -> None:
        if event.data.get("poison"):
            raise PermanentError("poison")
        started.set()
        await gate.wait()

    queue = backends.queue("measured")
    consumers.group.register(queue, ["job.measured"], handle, prefetch=1, retry_delays=FAST_RETRY)
    await consumers.group.start()
    await backends.bus.publish(Event.new("job.measured", {"poison": True}))
    await recorder.until(lambda: bool(recorder.results("parked")))
    for n in range(3):
        await backends.bus.publish(Event.new("job.measured", {"n": n}))
    await asyncio.wait_for(started.wait(), WAIT)

    # One message in the handler, two waiting behind it; one parked.
    await consumers.group.refresh_depths()
    assert sample(metrics, "vod_scheduler_queue_depth", queue=queue, state="ready") == 2
    assert sample(metrics, "vod_scheduler_queue_depth", queue=queue, state="parked") == 1

    gate.set()
    await recorder.until(lambda: len(recorder.results("acked")) == 3)
    await consumers.group.refresh_depths()

    assert sample(metrics, "vod_scheduler_queue_depth", queue=queue, state="ready") == 0
    assert sample(metrics, "vod_scheduler_messages_total", queue=queue, result="acked") == 3
    assert sample(metrics, "vod_scheduler_messages_total", queue=queue, result="parked") == 1
    assert sample(metrics, "vod_scheduler_messages_total", queue=queue, result="retried") is None


async def test_record_processed_says_whether_a_message_is_new(backends: Backends) -> None:
    async with backends.db.transaction() as conn:
        assert await record_processed(conn, "batcher", "m1")
        assert not await record_processed(conn, "batcher", "m1")
        # Another consumer has its own record of the same message.
        assert await record_processed(conn, "other", "m1")
    with pytest.raises(PermanentError, match="longer than 64"):
        async with backends.db.transaction() as conn:
            await record_processed(conn, "batcher", "x" * 65)
    backends.queues |= {"batcher", "other"}  # so that their rows are removed afterwards


async def test_registration_rules(backends: Backends, consumers: Consumers) -> None:
    group = consumers.group

    async def handle(_conn: AsyncConnection, _event: Event) -> None:
        return None

    group.register(backends.queue("first"), ["job.first"], handle, retry_delays=FAST_RETRY)
    with pytest.raises(ValueError, match="already registered"):
        group.register("first", ["job.other"], handle)
    with pytest.raises(ValueError, match="at most 64"):
        group.register("q" * 65, ["job.long"], handle)
    await group.start()

    with pytest.raises(RuntimeError, match="before the group starts"):
        group.register("late", ["job.late"], handle)
    assert group.queues == ["first"]


async def test_unacked_messages_are_counted_across_replicas(backends: Backends) -> None:
    gate = asyncio.Event()
    holding: list[str] = []

    async def handle(event: Event) -> None:
        holding.append(event.id)
        await gate.wait()

    queue = backends.queue("unacked")
    replicas = [
        ConsumerGroup(backends.db, backends.bus, kv=backends.kv, depth_interval=0.05)
        for _ in range(2)
    ]
    for group in replicas:
        group.register_raw(queue, ["job.unacked"], handle, prefetch=1, retry_delays=FAST_RETRY)
        await group.start()
    try:
        for n in range(3):
            await backends.bus.publish(Event.new("job.unacked", {"n": n}))

        # One message in each replica's handler (prefetch 1), the third waiting. Each
        # replica sees its own count at once and the other's once it has reported it
        # (every depth_interval, in the background: polled).
        async def both_counted() -> None:
            while True:
                if [await g.unacked() for g in replicas] == [{queue: 2}, {queue: 2}]:
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(both_counted(), WAIT)
        assert len(holding) == 2
        stats = await backends.bus.queue_stats(queue)
        assert (stats.ready, stats.consumers) == (1, 2)
    finally:
        gate.set()
        await replicas[0].close(grace=WAIT)
    # A replica that stopped takes its counts with it; the other still counts its own.
    assert await replicas[1].unacked() in ({queue: 0}, {queue: 1})
    await replicas[1].close(grace=WAIT)


async def test_record_processed_batch_records_each_id_once(backends: Backends) -> None:
    consumer, other = backends.queue("batch-recorder"), backends.queue("batch-other")
    async with backends.db.transaction() as conn:
        assert await record_processed(conn, consumer, "m1")
    async with backends.db.transaction() as conn:
        # m1 recorded before, m2 twice in the same batch.
        assert await record_processed_batch(conn, consumer, ["m1", "m2", "m3", "m2"]) == {
            "m2",
            "m3",
        }
        assert await record_processed_batch(conn, consumer, ["m2", "m3"]) == set()
        assert await record_processed_batch(conn, other, ["m1"]) == {"m1"}
        assert await record_processed_batch(conn, consumer, []) == set()
    for message_id in ("m1", "m2", "m3"):
        assert await processed(backends, consumer, message_id) == 1
    with pytest.raises(PermanentError, match="longer than 64"):
        async with backends.db.transaction() as conn:
            await record_processed_batch(conn, consumer, ["m4", "x" * 65])
    assert await processed(backends, consumer, "m4") == 0


@pytest.fixture
async def live_video(backends: Backends) -> AsyncIterator[str]:
    """A video to hang danmaku on; removed with its danmaku afterwards."""
    user_id, video_id = await add_video(backends.db)
    yield video_id
    async with backends.db.transaction() as conn:
        await conn.execute(delete(danmaku).where(danmaku.c.video_id == video_id))
        await conn.execute(delete(videos).where(videos.c.id == video_id))
        await conn.execute(delete(users).where(users.c.id == user_id))


def danmaku_created(video_id: str, offset: int) -> Event:
    return Event.new(
        DANMAKU_CREATED,
        {
            "id": new_id(),
            "video_id": video_id,
            "author_id": new_id(),
            "offset_ms": offset,
            "content": f"d{offset}",
            "mode": "scroll",
            "color": "#ffffff",
            "created_at": _now().isoformat(),
        },
    )


async def stored_danmaku(backends: Backends, video_id: str) -> list[str]:
    async with backends.db.connect() as conn:
        found = await conn.execute(select(danmaku.c.id).where(danmaku.c.video_id == video_id))
        return sorted(found.scalars())


async def recorded_ids(backends: Backends, consumer: str) -> list[str]:
    async with backends.db.connect() as conn:
        found = await conn.execute(
            select(processed_messages.c.message_id).where(processed_messages.c.consumer == consumer)
        )
        return sorted(found.scalars())


async def start_batcher(
    backends: Backends, consumers: Consumers, events: list[Event]
) -> tuple[str, DanmakuBatcher]:
    """A danmaku consumer whose batches are exactly ``len(events)`` messages: the size,
    never the clock, closes them."""
    queue = backends.queue("danmaku-batch")
    batcher = DanmakuBatcher(backends.db, consumer=queue, batch_size=len(events), max_wait=WAIT)
    consumers.group.register_raw(
        queue, [DANMAKU_CREATED], batcher.handle, prefetch=len(events), retry_delays=FAST_RETRY
    )
    await consumers.group.start()
    return queue, batcher


async def test_a_danmaku_batch_with_a_recorded_id_inserts_only_the_new_rows(
    backends: Backends, consumers: Consumers, live_video: str
) -> None:
    recorder = consumers.recorder
    events = [danmaku_created(live_video, offset) for offset in range(6)]
    queue, batcher = await start_batcher(backends, consumers, events)
    # events[2] was handled before (its batch committed, its ack was lost): its danmaku
    # must not be written a second time. Its row is left out here, so a second write
    # would show as a row rather than as a key clash.
    async with backends.db.transaction() as conn:
        assert await record_processed(conn, queue, events[2].id)
    new = [event for event in events if event is not events[2]]

    await backends.bus.publish_many(events)
    await recorder.until(lambda: len(recorder.outcomes) == len(events))

    assert sorted(o.event_id or "" for o in recorder.results("acked")) == sorted(
        event.id for event in events
    )
    assert list(batcher.batches_written) == [len(new)]  # one batch, one transaction
    assert await stored_danmaku(backends, live_video) == sorted(
        str(event.data["id"]) for event in new
    )
    assert await recorded_ids(backends, queue) == sorted(event.id for event in events)


async def test_a_message_id_too_long_to_record_is_parked_alone(
    backends: Backends, consumers: Consumers, live_video: str
) -> None:
    recorder = consumers.recorder
    good = [danmaku_created(live_video, offset) for offset in range(2)]
    made = danmaku_created(live_video, 2)
    too_long = Event(id="x" * 65, type=made.type, occurred_at=made.occurred_at, data=made.data)
    # Batches of two: the good messages fill one; the bad one must never join it.
    queue, batcher = await start_batcher(backends, consumers, good)

    await backends.bus.publish_many([good[0], too_long, good[1]])
    await recorder.until(lambda: len(recorder.outcomes) == 3)

    assert sorted((o.result, o.event_id or "") for o in recorder.outcomes) == sorted(
        [("acked", good[0].id), ("acked", good[1].id), ("parked", too_long.id)]
    )
    assert list(batcher.batches_written) == [2]
    assert await stored_danmaku(backends, live_video) == sorted(
        str(event.data["id"]) for event in good
    )
    assert await recorded_ids(backends, queue) == sorted(event.id for event in good)


# Longer than the 0.1 s for which InnoDB serves INNODB_TRX from a cache after each read.
INNODB_TRX_IDLE = 0.2


async def lock_waits(backends: Backends) -> int:
    """Transactions of the test database waiting for a row lock (MariaDB's own view)."""
    async with backends.db.connect() as conn:
        found = await conn.execute(
            text(
                "SELECT COUNT(*) FROM information_schema.INNODB_TRX t"
                " JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id"
                " WHERE t.trx_state = 'LOCK WAIT' AND p.DB = :db"
            ),
            {"db": make_url(backends.settings.db_url).database},
        )
        return int(found.scalar_one())


@pytest.mark.parametrize(
    "backends", [pytest.param("real", marks=pytest.mark.integration)], indirect=True
)
async def test_a_batch_racing_another_for_a_message_id_writes_its_new_rows_once(
    backends: Backends, consumers: Consumers, live_video: str
) -> None:
    recorder = consumers.recorder
    events = [danmaku_created(live_video, offset) for offset in range(4)]
    queue, batcher = await start_batcher(backends, consumers, events)
    # Another replica's batch holding a copy of events[0] records it and has not
    # committed yet when this batch looks: this one's insert of the same key waits.
    async with backends.db.transaction() as other:
        await other.execute(
            processed_messages.insert().values(
                consumer=queue, message_id=events[0].id, processed_at=_now()
            )
        )
        await backends.bus.publish_many(events)
        async with asyncio.timeout(WAIT):
            # MariaDB's lock view notifies no one: look again until the wait shows, less
            # often than every 0.1 s (InnoDB refreshes that view only after 0.1 s unread).
            while not await lock_waits(backends):  # noqa: ASYNC110
                await asyncio.sleep(INNODB_TRX_IDLE)
    # The other batch committed: this one rolls back and goes again, without events[0].
    await recorder.until(lambda: len(recorder.outcomes) == len(events))

    assert [o.result for o in recorder.outcomes] == ["acked"] * len(events)
    assert list(batcher.batches_written) == [len(events) - 1]
    assert await stored_danmaku(backends, live_video) == sorted(
        str(event.data["id"]) for event in events[1:]
    )
    assert await recorded_ids(backends, queue) == sorted(event.id for event in events)
