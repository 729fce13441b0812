"""Consumers: a handler per durable queue, each message's work done exactly once in effect.

The bus delivers at least once, with retries after growing delays and a parking queue
after ``max_attempts`` failures (``shared.bus``). What this module adds:

- **Idempotence** on the message id. ``ConsumerGroup.register`` wraps a handler that
  takes ``(conn, event)``: it runs inside one database transaction that also inserts
  ``(consumer, message id)`` into ``processed_messages``. Either both commit or neither
  does, so a redelivered message whose id is recorded is acked without running the
  handler, and a message whose handler failed leaves no trace and is retried. The insert
  comes first: on MySQL a second delivery of the same id racing the first waits on the
  row lock and then finds it done; on SQLite writers take turns anyway.
- **Permanent failures**: a handler raises ``PermanentError`` (a payload that breaks a
  rule, a file that cannot be decoded) and the message is parked at once, not retried.
- **Metrics**: every settled delivery, duplicates, and queue depths (ready and parked).
- **Unacked counts**: AMQP tells no one how many messages consumers hold unacked, so each
  group counts its handlers in flight per queue and, every ``depth_interval``, writes the
  counts to the Redis hash ``consumers:unacked`` (field ``<queue>|<replica>``, value
  ``<count>|<unix time>``); ``unacked`` adds up the fresh entries of every replica.

A handler whose work is not only database rows (files, thumbnails) must make that work
safe to repeat: it happens before the commit, and the commit may still fail.

Handlers that batch several messages into one transaction (danmaku) dedupe themselves:
``register_raw`` subscribes them as they are, and ``record_processed_batch`` records a
whole batch's ids in their own transaction, in two statements whatever the batch's size
(``record_processed``, one insert per id, is a round trip to the database per message).

Later consumers plug in through a registrar, ``(group, backends) -> None``, listed in
``scheduler_service.consumers.CONSUMERS``::

    def register(group: ConsumerGroup, backends: Backends) -> None:
        deletions = VideoDeletions(backends.blobs)
        group.register("video-deletions", [VIDEO_DELETED], deletions.handle)
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_service import cancellation
from scheduler_service.jobs.blob_collector import DEFAULT_GRACE
from scheduler_service.jobs.lease import replica_name
from scheduler_service.metrics import SchedulerMetrics
from shared.blobs import BlobStore
from shared.bus import (
    BusUnavailableError,
    Event,
    Handler,
    MessageBus,
    Outcome,
    PermanentError,
    Subscription,
)
from shared.bus.port import DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_DELAYS
from shared.db import Database, DuplicateKeyError, translate_errors
from shared.db.schema import processed_messages
from shared.kv import KeyValueError, KeyValueStore
from shared.settings import Settings

__all__ = [
    "Backends",
    "ConsumerGroup",
    "ConsumerRegistrar",
    "PermanentError",
    "TransactionalHandler",
    "check_message_id",
    "record_processed",
    "record_processed_batch",
]

logger = logging.getLogger(__name__)

TransactionalHandler = Callable[[AsyncConnection, Event], Awaitable[None]]

DEFAULT_PREFETCH = 16
DEFAULT_DEPTH_INTERVAL = 15.0
# The widths of processed_messages' key columns.
MAX_CONSUMER_CHARS = 64
MAX_MESSAGE_ID_CHARS = 64
UNACKED_KEY = "consumers:unacked"


@dataclass(frozen=True, slots=True, kw_only=True)
class Backends:
    """What a registrar may build its handlers on."""

    settings: Settings
    db: Database
    kv: KeyValueStore
    bus: MessageBus
    blobs: BlobStore
    # How long an unreferenced blob is kept (SchedulerOptions.blob_grace).
    blob_grace: timedelta = DEFAULT_GRACE


def check_message_id(message_id: str) -> None:
    """``PermanentError`` for a message id too long to record: it can never succeed."""
    if len(message_id) > MAX_MESSAGE_ID_CHARS:
        raise PermanentError(f"message id longer than {MAX_MESSAGE_ID_CHARS} characters")


async def record_processed(conn: AsyncConnection, consumer: str, message_id: str) -> bool:
    """Record that ``consumer`` handled ``message_id``, in ``conn``'s transaction.

    Returns False, changing nothing, if it was recorded before: the caller skips the work.
    """
    check_message_id(message_id)
    try:
        with translate_errors():
            await conn.execute(
                processed_messages.insert().values(
                    consumer=consumer, message_id=message_id, processed_at=datetime.now(UTC)
                )
            )
    except DuplicateKeyError:
        return False
    return True


async def record_processed_batch(
    conn: AsyncConnection, consumer: str, message_ids: Collection[str]
) -> set[str]:
    """Record that ``consumer`` handled every one of ``message_ids``, in ``conn``'s
    transaction; returns the ids recorded now, the others having been recorded before.

    One ``SELECT .. IN`` finds the ids recorded before and one multi-row ``INSERT`` records
    the rest (executemany, which the MySQL driver sends as a single statement). An id that
    another transaction records between the two is not skipped as ``record_processed``
    would: on MySQL the insert waits for that transaction, then raises
    ``DuplicateKeyError``; the caller's transaction must roll back and run again (its
    ``SELECT`` then sees the id). On SQLite writers take turns, so it cannot happen.
    """
    for message_id in message_ids:
        check_message_id(message_id)
    wanted = set(message_ids)
    if not wanted:
        return set()
    recorded = set(
        (
            await conn.execute(
                select(processed_messages.c.message_id).where(
                    processed_messages.c.consumer == consumer,
                    processed_messages.c.message_id.in_(wanted),
                )
            )
        ).scalars()
    )
    fresh = wanted - recorded
    if fresh:
        now = datetime.now(UTC)
        # Sorted: concurrent batches then lock the keys they share in the same order.
        with translate_errors():
            await conn.execute(
                processed_messages.insert(),
                [
                    {"consumer": consumer, "message_id": message_id, "processed_at": now}
                    for message_id in sorted(fresh)
                ],
            )
    return fresh


@dataclass(frozen=True, slots=True)
class _Registration:
    queue: str
    routing_keys: tuple[str, ...]
    handler: Handler
    prefetch: int
    max_attempts: int
    retry_delays: tuple[float, ...]


class ConsumerGroup:
    """The scheduler's consumers: register them all, then ``start``; ``close`` on exit."""

    def __init__(
        self,
        db: Database,
        bus: MessageBus,
        *,
        metrics: SchedulerMetrics | None = None,
        depth_interval: float = DEFAULT_DEPTH_INTERVAL,
        on_outcome: Callable[[Outcome], None] | None = None,
        kv: KeyValueStore | None = None,
    ) -> None:
        """``kv``: where the unacked counts of every replica meet (None: this one only)."""
        self._db = db
        self._bus = bus
        self._metrics = metrics or SchedulerMetrics()
        self._depth_interval = depth_interval
        self._outcome_listeners: list[Callable[[Outcome], None]] = (
            [on_outcome] if on_outcome is not None else []
        )
        self._registrations: dict[str, _Registration] = {}
        self._subscriptions: list[Subscription] = []
        self._depth_task: asyncio.Task[None] | None = None
        self._kv = kv
        self._replica = f"{replica_name()}:{secrets.token_hex(4)}"
        self._in_flight: dict[str, int] = {}

    @property
    def queues(self) -> list[str]:
        """The queue of every registered consumer, in registration order."""
        return list(self._registrations)

    def register(
        self,
        queue: str,
        routing_keys: Sequence[str],
        handler: TransactionalHandler,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    ) -> None:
        """Consume ``routing_keys`` from the durable queue ``queue`` with ``handler``,
        once per message id (the queue name is the consumer's name in processed_messages).
        """
        if len(queue) > MAX_CONSUMER_CHARS:
            raise ValueError(f"queue name {queue!r}: at most {MAX_CONSUMER_CHARS} characters")
        self.register_raw(
            queue,
            routing_keys,
            _Idempotent(self._db, queue, handler, self._count_duplicate),
            prefetch=prefetch,
            max_attempts=max_attempts,
            retry_delays=retry_delays,
        )

    def register_raw(
        self,
        queue: str,
        routing_keys: Sequence[str],
        handler: Handler,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    ) -> None:
        """Like ``register`` for a handler that deduplicates by itself."""
        if self._subscriptions:
            raise RuntimeError("register consumers before the group starts")
        if queue in self._registrations:
            raise ValueError(f"a consumer of queue {queue!r} is already registered")
        self._registrations[queue] = _Registration(
            queue, tuple(routing_keys), handler, prefetch, max_attempts, tuple(retry_delays)
        )

    async def start(self) -> None:
        """Subscribe every consumer; then keep the queue depth gauges fresh."""
        try:
            for registration in self._registrations.values():
                self._subscriptions.append(
                    await self._bus.subscribe(
                        registration.queue,
                        registration.routing_keys,
                        self._counted(registration.queue, registration.handler),
                        prefetch=registration.prefetch,
                        max_attempts=registration.max_attempts,
                        retry_delays=registration.retry_delays,
                        on_outcome=self._outcome,
                    )
                )
        except BaseException:
            await self.close(grace=0)
            raise
        if self._registrations:
            self._depth_task = asyncio.create_task(
                self._refresh_depths_forever(), name="scheduler:queue-depths"
            )

    async def close(self, *, grace: float | None = None) -> None:
        """Stop consuming; running handlers get ``grace`` seconds to finish."""
        if self._depth_task is not None:
            self._depth_task.cancel()
            await asyncio.gather(self._depth_task, return_exceptions=True)
            self._depth_task = None
        subscriptions, self._subscriptions = self._subscriptions, []
        await asyncio.gather(*(s.close(grace=grace) for s in subscriptions))
        await self._forget_unacked()

    async def refresh_depths(self) -> None:
        """Read every queue's depth (ready and parked) from the broker into the gauges."""
        for queue in self._registrations:
            ready = await self._bus.queue_depth(queue)
            # The parking queue is "<queue>.parked" by the bus's naming contract.
            parked = await self._bus.queue_depth(f"{queue}.parked")
            self._metrics.queue_depth.labels(queue, "ready").set(ready)
            self._metrics.queue_depth.labels(queue, "parked").set(parked)

    def _counted(self, queue: str, handler: Handler) -> Handler:
        """``handler``, counting the messages it holds (unacked until it returns)."""
        self._in_flight.setdefault(queue, 0)

        async def counted(event: Event) -> None:
            self._in_flight[queue] += 1
            try:
                await handler(event)
            finally:
                self._in_flight[queue] -= 1

        return counted

    async def unacked(self) -> dict[str, int]:
        """Messages consumers hold unacked, per queue: this replica's now, and the
        others' as they last reported them (within three ``depth_interval``)."""
        counts = dict.fromkeys(self._registrations, 0) | self._in_flight
        if self._kv is None:
            return counts
        oldest = time.time() - 3 * self._depth_interval
        stale = []
        for field_, value in (await self._kv.hgetall(UNACKED_KEY)).items():
            queue, _, replica = field_.partition("|")
            reported, _, at = value.partition("|")
            if not (_is_count(reported) and _is_number(at)) or float(at) < oldest:
                stale.append(field_)
            elif replica != self._replica and queue in counts:
                counts[queue] += int(reported)
        if stale:
            await self._kv.hdel(UNACKED_KEY, *stale)
        return counts

    async def _report_unacked(self) -> None:
        if self._kv is None or not self._in_flight:
            return
        now = f"{time.time():.3f}"
        await self._kv.hset(
            UNACKED_KEY,
            {
                f"{queue}|{self._replica}": f"{count}|{now}"
                for queue, count in self._in_flight.items()
            },
        )

    async def _forget_unacked(self) -> None:
        if self._kv is None or not self._in_flight:
            return
        try:
            await self._kv.hdel(UNACKED_KEY, *(f"{q}|{self._replica}" for q in self._in_flight))
        except KeyValueError as exc:
            logger.warning("consumers: could not remove this replica's unacked counts: %s", exc)

    async def _refresh_depths_forever(self) -> None:
        while True:
            try:
                await self._report_unacked()
            except KeyValueError as exc:
                logger.warning("consumers: cannot report unacked counts: %s", exc)
            try:
                await self.refresh_depths()
            except BusUnavailableError as exc:
                logger.warning("consumers: cannot read queue depths: %s", exc)
            except Exception:
                logger.exception("consumers: reading queue depths failed")
            await cancellation.sleep(self._depth_interval)

    def add_outcome_listener(self, listener: Callable[[Outcome], None]) -> None:
        """Also tell ``listener`` how every delivery was settled (after the metrics)."""
        self._outcome_listeners.append(listener)

    def _outcome(self, outcome: Outcome) -> None:
        self._metrics.messages.labels(outcome.queue, outcome.result).inc()
        for listener in self._outcome_listeners:
            listener(outcome)

    def _count_duplicate(self, queue: str, event: Event) -> None:
        self._metrics.duplicates.labels(queue).inc()
        logger.info(
            "consumer %s: %s %s already processed; acked without work",
            queue,
            event.type,
            event.id,
            extra={"event_id": event.id},
        )


class _Idempotent:
    """The bus handler around a ``TransactionalHandler``: dedupe and work in one commit."""

    def __init__(
        self,
        db: Database,
        consumer: str,
        handler: TransactionalHandler,
        on_duplicate: Callable[[str, Event], None],
    ) -> None:
        self._db = db
        self._consumer = consumer
        self._handler = handler
        self._on_duplicate = on_duplicate

    async def __call__(self, event: Event) -> None:
        async with self._db.transaction() as conn:
            first_time = await record_processed(conn, self._consumer, event.id)
            if first_time:
                await self._handler(conn, event)
        if not first_time:
            self._on_duplicate(self._consumer, event)


def _is_count(text: str) -> bool:
    # ASCII only: str.isdigit also accepts digits such as "²" that int() rejects.
    return text.isascii() and text.isdigit()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


ConsumerRegistrar = Callable[[ConsumerGroup, Backends], None]
