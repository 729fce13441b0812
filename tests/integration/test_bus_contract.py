"""The message-bus contract: every test runs against MemoryBus and RabbitMQ alike.

Each test gets a namespace of its own under the run's (so its exchange and queues never
meet another test's) and deletes it afterwards. Retry delays are tens of milliseconds,
and tests wait on what the handlers and ``on_outcome`` report, never on the clock.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
import pytest

from shared.bus import (
    BusTopologyError,
    BusUnavailableError,
    Event,
    MalformedEventError,
    MessageBus,
    Outcome,
    QueueStats,
    Subscription,
    open_bus,
)
from shared.logging import request_id_var

pytestmark = pytest.mark.integration

WAIT = 10.0  # upper bound for anything to arrive; a healthy run needs milliseconds
FAST_RETRY = (0.05, 0.1)


class Broker:
    """Opens buses on one per-test namespace and removes everything they made."""

    def __init__(self, kind: str, url: str, namespace: str) -> None:
        self.kind = kind
        self.url = url
        self.namespace = namespace
        self.queues: set[str] = set()
        self._buses: list[MessageBus] = []

    async def open(self, **kwargs: Any) -> MessageBus:
        bus = await open_bus(self.url, self.namespace, **kwargs)
        self._buses.append(bus)
        return bus

    def queue(self, name: str) -> str:
        self.queues.add(name)
        return name

    async def cleanup(self) -> None:
        for bus in self._buses:
            await bus.close(grace=1.0)
        janitor = await open_bus(self.url, self.namespace)
        try:
            await janitor.delete_namespace(self.queues)
        finally:
            await janitor.close()


class Recorder:
    """A handler and an ``on_outcome`` that remember what they saw, and can be awaited."""

    def __init__(self, fail: Callable[[Event], bool] = lambda _: False) -> None:
        self.events: list[Event] = []
        self.request_ids: dict[str, str | None] = {}
        self.outcomes: list[Outcome] = []
        self._fail = fail
        self._changed = asyncio.Event()

    async def handle(self, event: Event) -> None:
        self.events.append(event)
        self.request_ids[event.id] = request_id_var.get()
        self._changed.set()
        if self._fail(event):
            raise RuntimeError(f"boom on {event.type}")

    def outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self._changed.set()

    def results(self, result: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == result]

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture(params=["memory", "rabbitmq"])
async def broker(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Broker]:
    test_namespace = f"{namespace}_{secrets.token_hex(3)}"
    if request.param == "memory":
        url = f"memory://{test_namespace}"
    else:
        url = request.getfixturevalue("amqp_server_url")
    broker = Broker(request.param, url, test_namespace)
    yield broker
    await broker.cleanup()


@pytest.fixture
async def bus(broker: Broker) -> MessageBus:
    return await broker.open()


async def subscribe(
    bus: MessageBus,
    queue: str,
    keys: list[str],
    recorder: Recorder,
    **kwargs: Any,
) -> Subscription:
    kwargs.setdefault("retry_delays", FAST_RETRY)
    return await bus.subscribe(queue, keys, recorder.handle, on_outcome=recorder.outcome, **kwargs)


def _has_type(recorder: Recorder, type_: str) -> bool:
    return any(e.type == type_ for e in recorder.events)


# --- the event and its wire format ------------------------------------------------


def test_event_serialises_to_the_documented_wire_format() -> None:
    event = Event.new("video.deleted", {"video_id": "v1", "tags": ["a"], "n": 3})

    document = orjson.loads(event.to_json())

    assert list(document) == ["id", "type", "occurred_at", "data"]
    assert uuid.UUID(document["id"]).version == 4
    assert document["type"] == "video.deleted"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", document["occurred_at"])
    assert document["data"] == {"video_id": "v1", "tags": ["a"], "n": 3}
    assert Event.from_json(event.to_json()) == event


def test_event_times_are_normalised_to_utc() -> None:
    event = Event.from_json(
        b'{"id": "e1", "type": "a.b", "occurred_at": "2024-05-01T10:00:00+02:00", "data": {}}'
    )
    assert event.occurred_at == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    assert b'"2024-05-01T08:00:00Z"' in event.to_json()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"id": "e1", "type": "a.b", "data": {}}',
        b'{"id": 7, "type": "a.b", "occurred_at": "2024-05-01T10:00:00Z", "data": {}}',
        b'{"id": "e1", "type": "a.*", "occurred_at": "2024-05-01T10:00:00Z", "data": {}}',
        b'{"id": "e1", "type": "a.b", "occurred_at": "2024-05-01T10:00:00", "data": {}}',
        b'{"id": "e1", "type": "a.b", "occurred_at": "yesterday", "data": {}}',
        b'{"id": "e1", "type": "a.b", "occurred_at": "2024-05-01T10:00:00Z", "data": []}',
    ],
)
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedEventError):
        Event.from_json(body)


async def test_open_bus_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="scheme"):
        await open_bus("redis://127.0.0.1/", "vodtest")


# --- the contract, on both adapters ------------------------------------------------


async def test_routes_by_key_and_wildcards(broker: Broker, bus: MessageBus) -> None:
    bindings = {
        "exact": ["video.deleted"],
        "star": ["video.*"],
        "hash": ["#.completed"],
        "several": ["upload.#", "danmaku.created"],
    }
    recorders = {name: Recorder() for name in bindings}
    for name, keys in bindings.items():
        # The "end.#" sentinel arrives last: once a queue has it, it has had all the rest.
        await subscribe(bus, broker.queue(name), [*keys, "end.#"], recorders[name], prefetch=1)

    for key in [
        "video.deleted",
        "video.created",
        "video.thumbnail.ready",
        "upload.completed",
        "upload.part.completed",
        "danmaku.created",
        "end.now",
    ]:
        await bus.publish(Event.new(key, {}))

    for recorder in recorders.values():
        await recorder.until(partial(_has_type, recorder, "end.now"))
    received = {name: [e.type for e in r.events][:-1] for name, r in recorders.items()}
    assert received == {
        "exact": ["video.deleted"],
        "star": ["video.deleted", "video.created"],
        "hash": ["upload.completed", "upload.part.completed"],
        "several": ["upload.completed", "upload.part.completed", "danmaku.created"],
    }


async def test_parked_message_keeps_the_wire_body_and_headers(
    broker: Broker, bus: MessageBus
) -> None:
    queue = broker.queue("wire")
    recorder = Recorder(fail=lambda _: True)
    await subscribe(bus, queue, ["video.#"], recorder, max_attempts=1)
    event = Event.new("video.deleted", {"video_id": "v1"})

    token = request_id_var.set("req-wire")
    try:
        await bus.publish(event, headers={"x-tenant": "t1"})
    finally:
        request_id_var.reset(token)
    await recorder.until(lambda: bool(recorder.results("parked")))

    [parked] = await bus.parked_messages(queue)
    assert parked.body == event.to_json()
    assert orjson.loads(parked.body) == {
        "id": event.id,
        "type": "video.deleted",
        "occurred_at": event.occurred_at.isoformat().replace("+00:00", "Z"),
        "data": {"video_id": "v1"},
    }
    assert parked.headers["x-request-id"] == "req-wire"
    assert parked.headers["x-tenant"] == "t1"
    assert parked.routing_key == "video.deleted"
    assert parked.attempts == 1
    assert parked.error == "RuntimeError: boom on video.deleted"
    assert await bus.parked(queue) == [event]
    # Peeking leaves the message where it is.
    assert len(await bus.parked_messages(queue)) == 1


async def test_a_hand_written_json_body_is_an_event(broker: Broker, bus: MessageBus) -> None:
    recorder = Recorder()
    await subscribe(bus, broker.queue("foreign"), ["upload.completed"], recorder)
    body = (
        b'{"id": "0b1c", "type": "upload.completed",'
        b' "occurred_at": "2024-05-01T10:00:00.250Z", "data": {"upload_id": "u1"}}'
    )

    await bus.publish_raw("upload.completed", body)
    await recorder.until(lambda: len(recorder.events) == 1)

    assert recorder.events == [
        Event(
            id="0b1c",
            type="upload.completed",
            occurred_at=datetime(2024, 5, 1, 10, 0, 0, 250000, tzinfo=UTC),
            data={"upload_id": "u1"},
        )
    ]


async def test_the_request_id_travels_to_the_handler(broker: Broker, bus: MessageBus) -> None:
    recorder = Recorder()
    await subscribe(bus, broker.queue("traced"), ["job.*"], recorder, prefetch=1)
    traced, untraced = Event.new("job.traced", {}), Event.new("job.untraced", {})

    token = request_id_var.set("req-42")
    try:
        await bus.publish(traced)
    finally:
        request_id_var.reset(token)
    await bus.publish(untraced)
    await recorder.until(lambda: len(recorder.events) == 2)

    assert recorder.request_ids == {traced.id: "req-42", untraced.id: None}
    assert request_id_var.get() is None


async def test_a_failing_handler_is_retried_after_growing_delays(
    broker: Broker, bus: MessageBus
) -> None:
    queue = broker.queue("flaky")
    loop = asyncio.get_running_loop()
    runs: list[float] = []

    def fail_twice(_: Event) -> bool:
        runs.append(loop.time())
        return len(runs) <= 2

    recorder = Recorder(fail=fail_twice)
    await subscribe(bus, queue, ["job.*"], recorder, max_attempts=5, retry_delays=(0.05, 0.2))
    event = Event.new("job.flaky", {})

    await bus.publish(event)
    await recorder.until(lambda: bool(recorder.results("acked")))

    assert [(o.result, o.attempt) for o in recorder.outcomes] == [
        ("retried", 1),
        ("retried", 2),
        ("acked", 3),
    ]
    assert recorder.outcomes[0].error == "RuntimeError: boom on job.flaky"
    assert recorder.events == [event, event, event]
    # Never sooner than the delay of its attempt (a little slack for clock rounding).
    assert runs[1] - runs[0] >= 0.045
    assert runs[2] - runs[1] >= 0.18
    assert await bus.parked(queue) == []
    assert await bus.queue_depth(queue) == 0


async def test_a_poison_message_is_parked_and_does_not_block_the_queue(
    broker: Broker, bus: MessageBus
) -> None:
    queue = broker.queue("poisoned")
    recorder = Recorder(fail=lambda e: e.type == "job.poison")
    # One handler at a time: were the poison retried in place, nothing else could pass.
    await subscribe(
        bus, queue, ["job.*"], recorder, prefetch=1, max_attempts=3, retry_delays=(0.05,)
    )
    poison = Event.new("job.poison", {})
    good = [Event.new("job.good", {"n": n}) for n in range(5)]

    await bus.publish(poison)
    for event in good:
        await bus.publish(event)
    await recorder.until(
        lambda: len(recorder.results("acked")) == 5 and len(recorder.results("parked")) == 1
    )

    assert [e.id for e in recorder.events if e.type == "job.good"] == [e.id for e in good]
    poison_outcomes = [(o.result, o.attempt) for o in recorder.outcomes if o.event_id == poison.id]
    assert poison_outcomes == [("retried", 1), ("retried", 2), ("parked", 3)]
    first_good = next(i for i, o in enumerate(recorder.outcomes) if o.result == "acked")
    assert first_good < recorder.outcomes.index(recorder.results("parked")[0])
    assert await bus.parked(queue) == [poison]
    [parked] = await bus.parked_messages(queue)
    assert parked.attempts == 3
    assert parked.error == "RuntimeError: boom on job.poison"
    assert await bus.queue_depth(queue) == 0


async def test_a_malformed_body_goes_straight_to_the_parking_queue(
    broker: Broker, bus: MessageBus
) -> None:
    queue = broker.queue("garbled")
    recorder = Recorder()
    await subscribe(bus, queue, ["job.*"], recorder, prefetch=1)
    good = Event.new("job.good", {})

    await bus.publish_raw("job.garbled", b"{not json")
    await bus.publish_raw("job.partial", b'{"id": "e1"}')
    await bus.publish(good)
    await recorder.until(
        lambda: len(recorder.results("parked")) == 2 and bool(recorder.results("acked"))
    )

    assert recorder.events == [good]
    assert [(o.routing_key, o.event_id, o.attempt) for o in recorder.results("parked")] == [
        ("job.garbled", None, 1),
        ("job.partial", None, 1),
    ]
    parked = await bus.parked_messages(queue)
    assert [(p.body, p.routing_key) for p in parked] == [
        (b"{not json", "job.garbled"),
        (b'{"id": "e1"}', "job.partial"),
    ]
    assert all(p.error.startswith("malformed event: ") for p in parked)
    assert await bus.parked(queue) == []


async def test_requeued_parked_messages_start_again_with_every_attempt(
    broker: Broker, bus: MessageBus
) -> None:
    queue = broker.queue("requeued")
    broken = {"yes": True}
    recorder = Recorder(fail=lambda _: broken["yes"])
    await subscribe(bus, queue, ["job.*"], recorder, prefetch=1, max_attempts=2)
    events = [Event.new("job.stuck", {"n": n}) for n in range(3)]
    token = request_id_var.set("req-requeue")
    try:
        for event in events:
            await bus.publish(event, headers={"x-tenant": "t1"})
    finally:
        request_id_var.reset(token)
    await recorder.until(lambda: len(recorder.results("parked")) == 3)
    # Parked after a retry: the key it was published with is still known.
    assert {p.routing_key for p in await bus.parked_messages(queue)} == {"job.stuck"}

    broken["yes"] = False  # the operator fixed the cause
    assert await bus.requeue_parked(queue, limit=2) == 2
    await recorder.until(lambda: len(recorder.results("acked")) == 2)

    acked = recorder.results("acked")
    assert sorted(o.event_id or "" for o in acked) == sorted(e.id for e in events[:2])
    # A fresh start: the first run of a full set of attempts, not the third.
    assert [(o.attempt, o.routing_key) for o in acked] == [(1, "job.stuck")] * 2
    assert recorder.request_ids[events[0].id] == "req-requeue"
    [left] = await bus.parked_messages(queue)
    assert (left.event, left.attempts, left.headers["x-tenant"]) == (events[2], 2, "t1")

    assert await bus.requeue_parked(queue) == 1
    await recorder.until(lambda: len(recorder.results("acked")) == 3)
    assert await bus.requeue_parked(queue) == 0
    assert await bus.parked_messages(queue) == []
    assert await bus.requeue_parked(broker.queue("never-declared")) == 0


async def test_queue_stats_count_messages_by_state(broker: Broker, bus: MessageBus) -> None:
    queue = broker.queue("counted")
    # A delay far longer than the test: a failed message stays in its delay queue.
    slow_retry = (60.0,)
    assert await bus.queue_stats(queue) == QueueStats(ready=0, retrying=0, parked=0, consumers=0)
    await bus.declare_queue(queue, ["job.*"], retry_delays=slow_retry)
    for kind in ("first", "second", "fine"):
        await bus.publish(Event.new("job.counted", {"kind": kind}))
    assert await bus.queue_stats(queue) == QueueStats(ready=3, retrying=0, parked=0, consumers=0)

    recorder = Recorder(fail=lambda e: e.data["kind"] != "fine")
    await subscribe(
        bus, queue, ["job.*"], recorder, retry_delays=slow_retry, max_attempts=2, prefetch=1
    )
    await recorder.until(lambda: len(recorder.outcomes) == 3 and not recorder.results("parked"))
    assert await bus.queue_stats(queue) == QueueStats(ready=0, retrying=2, parked=0, consumers=1)
    # A message that cannot be an event parks at once.
    await bus.publish_raw("job.counted", b"not an event")
    await recorder.until(lambda: len(recorder.results("parked")) == 1)

    assert await bus.queue_stats(queue) == QueueStats(ready=0, retrying=2, parked=1, consumers=1)


async def test_messages_published_before_subscribing_are_delivered(
    broker: Broker, bus: MessageBus
) -> None:
    queue = broker.queue("early")
    await bus.declare_queue(queue, ["job.*"], retry_delays=FAST_RETRY)
    events = [Event.new("job.early", {"n": n}) for n in range(3)]
    for event in events:
        await bus.publish(event)
    assert await bus.queue_depth(queue) == 3

    recorder = Recorder()
    await subscribe(bus, queue, ["job.*"], recorder, prefetch=1)
    await recorder.until(lambda: len(recorder.results("acked")) == 3)

    assert recorder.events == events
    assert await bus.queue_depth(queue) == 0


async def test_messages_wait_for_a_restarted_consumer(broker: Broker) -> None:
    queue = broker.queue("restarted")
    first_run = await broker.open()
    recorder = Recorder()
    subscription = await subscribe(first_run, queue, ["job.*"], recorder)
    await first_run.publish(before := Event.new("job.before", {}))
    await recorder.until(lambda: len(recorder.events) == 1)
    await subscription.close()
    await first_run.close()

    producer = await broker.open()
    await producer.publish(during := Event.new("job.during", {}))
    assert await producer.queue_depth(queue) == 1
    await producer.close()

    second_run = await broker.open()
    restarted = Recorder()
    await subscribe(second_run, queue, ["job.*"], restarted)
    await restarted.until(lambda: len(restarted.events) == 1)

    assert recorder.events == [before]
    assert restarted.events == [during]


async def test_prefetch_caps_concurrent_handlers(broker: Broker, bus: MessageBus) -> None:
    queue = broker.queue("capped")
    await bus.declare_queue(queue, ["job.*"], retry_delays=FAST_RETRY)
    await bus.publish_many(Event.new("job.capped", {"n": n}) for n in range(10))
    running = 0
    most_running = 0
    three_running = asyncio.Event()
    gate = asyncio.Event()

    async def handle(_: Event) -> None:
        nonlocal running, most_running
        running += 1
        most_running = max(most_running, running)
        if running == 3:
            three_running.set()
        try:
            await gate.wait()
        finally:
            running -= 1

    recorder = Recorder()
    await bus.subscribe(
        queue,
        ["job.*"],
        handle,
        prefetch=3,
        retry_delays=FAST_RETRY,
        on_outcome=recorder.outcome,
    )
    await asyncio.wait_for(three_running.wait(), WAIT)

    # With three handlers blocked, the other seven are still waiting in the queue.
    assert await bus.queue_depth(queue) == 7
    gate.set()
    await recorder.until(lambda: len(recorder.results("acked")) == 10)
    assert most_running == 3


async def test_a_slow_message_does_not_hold_back_the_ones_after_it(
    broker: Broker, bus: MessageBus
) -> None:
    """Finished messages are settled at once even while an earlier one runs on, so the
    prefetch window keeps moving (the RabbitMQ adapter acks batches together)."""
    queue = broker.queue("unblocked")
    await bus.declare_queue(queue, ["job.*"], retry_delays=FAST_RETRY)
    events = [Event.new("job.step", {"n": n}) for n in range(4)]
    await bus.publish_many(events)
    gate = asyncio.Event()
    recorder = Recorder()

    async def handle(event: Event) -> None:
        await recorder.handle(event)
        if event.id == events[0].id:
            await gate.wait()

    await bus.subscribe(
        queue, ["job.*"], handle, prefetch=2, retry_delays=FAST_RETRY, on_outcome=recorder.outcome
    )
    # Two slots: the first is held; the other three pass one by one through the second.
    await recorder.until(lambda: len(recorder.results("acked")) == 3)
    assert events[0].id not in {outcome.event_id for outcome in recorder.results("acked")}
    gate.set()
    await recorder.until(lambda: len(recorder.results("acked")) == 4)


async def test_a_batch_that_finishes_together_is_acked_for_good(
    broker: Broker, bus: MessageBus
) -> None:
    """Fifty handlers released at once: every message is settled with the broker, so a
    closed and reopened consumer gets none of them again."""
    queue = broker.queue("together")
    await bus.declare_queue(queue, ["job.*"], retry_delays=FAST_RETRY)
    events = [Event.new("job.many", {"n": n}) for n in range(50)]
    await bus.publish_many(events)
    gate = asyncio.Event()
    recorder = Recorder()

    async def handle(event: Event) -> None:
        await recorder.handle(event)
        await gate.wait()

    subscription = await bus.subscribe(
        queue, ["job.*"], handle, prefetch=50, retry_delays=FAST_RETRY, on_outcome=recorder.outcome
    )
    await recorder.until(lambda: len(recorder.events) == 50)
    gate.set()
    await recorder.until(lambda: len(recorder.results("acked")) == 50)
    await subscription.close(grace=WAIT)

    # Closing returns whatever the broker still counts unacked to the queue.
    assert await bus.queue_depth(queue) == 0


async def test_close_lets_the_running_handler_finish(broker: Broker, bus: MessageBus) -> None:
    queue = broker.queue("graceful")
    await bus.declare_queue(queue, ["job.*"], retry_delays=FAST_RETRY)
    first, second = Event.new("job.first", {}), Event.new("job.second", {})
    await bus.publish(first)
    await bus.publish(second)
    started = asyncio.Event()
    gate = asyncio.Event()
    finished: list[Event] = []

    async def handle(event: Event) -> None:
        started.set()
        await gate.wait()
        finished.append(event)

    subscription = await bus.subscribe(
        queue, ["job.*"], handle, prefetch=1, retry_delays=FAST_RETRY
    )
    await asyncio.wait_for(started.wait(), WAIT)
    closing = asyncio.create_task(subscription.close(grace=WAIT))

    done, _ = await asyncio.wait({closing}, timeout=0.05)
    assert not done, "close() returned while a handler was still running"
    gate.set()
    await asyncio.wait_for(closing, WAIT)

    assert finished == [first]
    assert await bus.queue_depth(queue) == 1
    recorder = Recorder()
    await subscribe(bus, queue, ["job.*"], recorder)
    await recorder.until(lambda: len(recorder.events) == 1)
    assert recorder.events == [second]


async def test_close_returns_unacked_messages_to_the_queue(broker: Broker, bus: MessageBus) -> None:
    queue = broker.queue("abandoned")
    await bus.declare_queue(queue, ["job.*"], retry_delays=FAST_RETRY)
    events = [Event.new("job.stuck", {"n": n}) for n in range(3)]
    await bus.publish_many(events)
    stuck = Recorder()
    never = asyncio.Event()

    async def hang(event: Event) -> None:
        await stuck.handle(event)
        await never.wait()

    subscription = await bus.subscribe(queue, ["job.*"], hang, prefetch=2, retry_delays=FAST_RETRY)
    await stuck.until(lambda: len(stuck.events) == 2)
    await subscription.close(grace=0.05)

    recorder = Recorder()
    await subscribe(bus, queue, ["job.*"], recorder)
    await recorder.until(lambda: len(recorder.events) == 3)
    assert {e.id for e in recorder.events} == {e.id for e in events}
    assert await bus.queue_depth(queue) == 0


async def test_a_queue_keeps_the_retry_delays_it_was_declared_with(
    broker: Broker, bus: MessageBus
) -> None:
    queue = broker.queue("scheduled")
    await bus.declare_queue(queue, ["job.*"], retry_delays=(0.05, 0.1))
    # Fewer attempts need fewer delay queues: compatible.
    await bus.declare_queue(queue, ["job.*"], max_attempts=2, retry_delays=(0.05,))

    with pytest.raises(BusTopologyError, match="x-message-ttl"):
        await bus.subscribe(queue, ["job.*"], Recorder().handle, retry_delays=(1.0, 0.1))
    # The refusal does not harm the bus.
    await bus.publish(Event.new("job.fine", {}))
    assert await bus.queue_depth(queue) == 1


async def test_publish_many_delivers_every_event(broker: Broker, bus: MessageBus) -> None:
    queue = broker.queue("bulk")
    recorder = Recorder()
    await subscribe(bus, queue, ["bulk.*"], recorder, prefetch=50)
    events = [Event.new("bulk.item", {"n": n}) for n in range(300)]

    await bus.publish_many(events)
    await recorder.until(lambda: len(recorder.results("acked")) == 300)

    assert sorted(e.data["n"] for e in recorder.events) == list(range(300))


async def test_a_closed_bus_refuses_quickly(broker: Broker, bus: MessageBus) -> None:
    await bus.ping()
    await bus.close()

    async with asyncio.timeout(2):
        with pytest.raises(BusUnavailableError):
            await bus.publish(Event.new("job.late", {}))
        with pytest.raises(BusUnavailableError):
            await bus.publish_many([Event.new("job.late", {})])
        with pytest.raises(BusUnavailableError):
            await bus.subscribe(broker.queue("late"), ["job.*"], Recorder().handle)
        with pytest.raises(BusUnavailableError):
            await bus.ping()


# --- adapter-specific ----------------------------------------------------------


async def test_memory_buses_of_one_name_share_a_broker(namespace: str) -> None:
    name = f"memory://{namespace}-{secrets.token_hex(3)}"
    test_namespace = f"{namespace}_{secrets.token_hex(3)}"
    producer = await open_bus(name, test_namespace)
    consumer = await open_bus(name, test_namespace)
    try:
        recorder = Recorder()
        await subscribe(consumer, "shared", ["job.*"], recorder)
        await producer.publish(event := Event.new("job.shared", {}))
        await recorder.until(lambda: len(recorder.events) == 1)
        assert recorder.events == [event]
    finally:
        await consumer.delete_namespace(["shared"])
        await consumer.close()
        await producer.close()


class TcpProxy:
    """A socket relay in front of RabbitMQ that a test can cut, like a network outage."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        # Cleared by hold_upstream: what clients send waits in the relay.
        self._upstream_open = asyncio.Event()
        self._upstream_open.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, upstream_writer}
        for source, sink, gate in (
            (reader, upstream_writer, self._upstream_open),
            (upstream_reader, writer, None),
        ):
            task = asyncio.create_task(self._pipe(source, sink, gate))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, gate: asyncio.Event | None
    ) -> None:
        try:
            while data := await source.read(65536):
                if gate is not None:
                    await gate.wait()
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    def hold_upstream(self) -> None:
        """Keep what clients send (acks, publishes) from reaching the broker, while the
        broker's side still flows; until ``cut``, which throws the held bytes away."""
        self._upstream_open.clear()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        for pipe in self._pipes:
            pipe.cancel()  # one may be waiting at a held gate
        await asyncio.gather(*self._pipes, return_exceptions=True)
        self._upstream_open.set()


@pytest.fixture
async def rabbit_namespace(amqp_server_url: str, namespace: str) -> AsyncIterator[str]:
    test_namespace = f"{namespace}_{secrets.token_hex(3)}"
    yield test_namespace
    janitor = await open_bus(amqp_server_url, test_namespace)
    await janitor.delete_namespace([])
    await janitor.close()


async def test_rabbit_down_at_start_fails_fast(rabbit_namespace: str) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(BusUnavailableError) as caught:
        await open_bus("amqp://vod:s3cret@127.0.0.1:1/", rabbit_namespace, call_timeout=2)

    assert loop.time() - started < 3
    assert "s3cret" not in str(caught.value)


async def test_rabbit_outage_fails_publish_in_bounded_time_and_recovers(
    amqp_server_url: str, rabbit_namespace: str
) -> None:
    from urllib.parse import urlsplit

    target = urlsplit(amqp_server_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    url = target._replace(
        netloc=f"{target.username}:{target.password}@127.0.0.1:{proxy.port}",
        query="reconnect_interval=0.1",
    ).geturl()
    bus = await open_bus(url, rabbit_namespace, call_timeout=0.5)
    loop = asyncio.get_running_loop()
    try:
        await bus.publish(Event.new("job.before", {}))
        await proxy.cut()

        started = loop.time()
        with pytest.raises(BusUnavailableError):
            await bus.publish(Event.new("job.during", {}))
        assert loop.time() - started < 1.5
        with pytest.raises(BusUnavailableError):
            await bus.ping()

        await proxy.start()
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    await bus.publish(Event.new("job.after", {}))
                    break
                except BusUnavailableError:
                    # Not timing: just not spinning while the client reconnects.
                    await asyncio.sleep(0.05)
    finally:
        await bus.close()
        await proxy.cut()
