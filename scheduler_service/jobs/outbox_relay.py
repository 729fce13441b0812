"""The outbox relay: events committed to the ``outbox`` table go to the broker, none lost.

One relay at a time, chosen by a Redis lease (``lease:outbox-relay``). Every scheduler
replica runs an ``OutboxRelay``; the one holding the lease relays, the others try to
take it every ``poll_interval`` and take over within that after a clean shutdown (the
lease is released) or within ``lease_ttl`` after a crash (it expires).

The leader loops: read up to ``batch_size`` unsent rows in id order, publish each with a
publisher confirm (``publish_raw``: the payload column is the exact body), then stamp
``sent_at`` (and count the attempt) for those that went out, in one short transaction.
It drains batch after batch, then waits ``poll_interval`` or until nudged (``nudge()``,
or ``shared.outbox.nudge_relay`` from any process through Redis pub/sub).

Why a lease and not ``SELECT ... FOR UPDATE SKIP LOCKED``: row claiming would hold row
locks and a pooled connection open across every broker round trip, for the broker's whole
timeout when it is down, and on SQLite (one writer for the whole database) it would block
every other writer meanwhile; a lease works the same on both databases and keeps the
transactions short. One publisher also keeps events in id order. The price: a Redis
outage pauses the relay too (events wait, none are lost), and failover after a crash takes
up to ``lease_ttl``.

Delivery is at least once. An event is published again if the stamp fails to commit
after the publish (crash, database outage), or if a leader stalled past its lease finishes
a batch after another took over (the renewal failing cancels it at the next renewal).
Consumers deduplicate on the event id.

Failures never stop the loop. A broker outage (``BusUnavailableError``) ends the batch at
the row that failed, whose ``attempts`` is counted, and the relay retries after a back-off
doubling from ``poll_interval`` up to ``backoff_max``. A row the broker refuses for any
other reason is counted and skipped for this pass (rows after it still go out), then
retried after the same back-off: it never blocks the rows behind it.

Sent rows are kept ``retention`` for diagnosis, then deleted by the leader (checked every
``purge_interval``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import delete, select, update

from scheduler_service import cancellation
from scheduler_service.jobs.lease import Lease, LeaseLostError, hold
from scheduler_service.metrics import SchedulerMetrics
from shared.bus import BusUnavailableError
from shared.bus.port import describe
from shared.db import Database, DatabaseUnavailableError
from shared.db.schema import outbox
from shared.kv import KeyValueError, KeyValueStore
from shared.outbox import NUDGE_CHANNEL

logger = logging.getLogger(__name__)

LEASE_NAME = "outbox-relay"
DEFAULT_BATCH_SIZE = 100
DEFAULT_POLL_INTERVAL = 0.5
DEFAULT_LEASE_TTL = 15.0
DEFAULT_BACKOFF_MAX = 30.0
DEFAULT_RETENTION = timedelta(days=7)
DEFAULT_PURGE_INTERVAL = 3600.0
PURGE_BATCH = 1000


class RawPublisher(Protocol):
    """The one thing the relay needs of a ``MessageBus``."""

    async def publish_raw(
        self, routing_key: str, body: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None: ...


class RelayError(Exception):
    """A batch did not go out whole; the relay backs off before the next one."""


@dataclass(frozen=True, slots=True)
class RelayReport:
    """What one batch did, told to ``on_batch`` once its stamps are committed."""

    sent: tuple[str, ...]  # event ids published and stamped, in id order
    failed: tuple[str, ...]  # event ids whose publish failed; still unsent
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    event_id: str
    routing_key: str
    payload: str


class OutboxRelay:
    """Relays the outbox while this replica holds the lease; see the module docstring."""

    def __init__(
        self,
        db: Database,
        bus: RawPublisher,
        kv: KeyValueStore,
        *,
        owner: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        retention: timedelta = DEFAULT_RETENTION,
        purge_interval: float = DEFAULT_PURGE_INTERVAL,
        metrics: SchedulerMetrics | None = None,
        on_batch: Callable[[RelayReport], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if poll_interval <= 0 or lease_ttl <= 0 or backoff_max <= 0:
            raise ValueError("poll_interval, lease_ttl and backoff_max must be positive")
        self._db = db
        self._bus = bus
        self._kv = kv
        self._owner = owner
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._lease_ttl = lease_ttl
        self._backoff_max = backoff_max
        self._retention = retention
        self._purge_interval = purge_interval
        self._metrics = metrics or SchedulerMetrics()
        self._on_batch = on_batch
        self._wake = asyncio.Event()
        self._leading = False
        # Set while subscribed to nudges: a nudge sent before that is not heard.
        self.listening = asyncio.Event()

    @property
    def leading(self) -> bool:
        """True while this relay holds the lease."""
        return self._leading

    def nudge(self) -> None:
        """Look for new rows now rather than at the next poll (ignored while backing off)."""
        self._wake.set()

    async def run(self) -> None:
        """Relay whenever this replica holds the lease, until cancelled. Never raises."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._lead_when_possible(), name="scheduler:outbox-relay:lead")
            group.create_task(self._listen_for_nudges(), name="scheduler:outbox-relay:nudges")

    # -- one pass, usable on its own -------------------------------------------------

    async def drain(self) -> int:
        """Relay batch after batch until no unsent row is left; returns how many went out.

        Raises ``RelayError`` when a batch did not go out whole (after stamping what did).
        """
        total = 0
        while True:
            rows = await self._unsent()
            if not rows:
                return total
            report = await self._relay(rows)
            total += len(report.sent)
            if report.error is not None:
                raise RelayError(report.error)
            if len(rows) < self._batch_size:
                return total

    async def purge_sent(self, now: datetime | None = None) -> int:
        """Delete rows sent more than ``retention`` before ``now``; returns how many."""
        cutoff = (now or datetime.now(UTC)) - self._retention
        purged = 0
        while True:
            # Ids first, then DELETE by id: MariaDB refuses LIMIT in an IN subquery.
            async with self._db.connect() as conn:
                result = await conn.execute(
                    select(outbox.c.id).where(outbox.c.sent_at < cutoff).limit(PURGE_BATCH)
                )
                ids = [row.id for row in result]
            if not ids:
                break
            async with self._db.transaction() as conn:
                await conn.execute(delete(outbox).where(outbox.c.id.in_(ids)))
            purged += len(ids)
            if len(ids) < PURGE_BATCH:
                break
        if purged:
            self._metrics.outbox_purged.inc(purged)
            logger.info("outbox: purged %d sent rows older than %s", purged, cutoff.isoformat())
        return purged

    async def _unsent(self) -> list[_Row]:
        async with self._db.connect() as conn:
            result = await conn.execute(
                select(outbox.c.id, outbox.c.event_id, outbox.c.routing_key, outbox.c.payload)
                .where(outbox.c.sent_at.is_(None))
                .order_by(outbox.c.id)
                .limit(self._batch_size)
            )
            return [_Row(r.id, r.event_id, r.routing_key, r.payload) for r in result]

    async def _relay(self, rows: Sequence[_Row]) -> RelayReport:
        sent: list[_Row] = []
        failed: list[_Row] = []
        error: str | None = None
        for row in rows:
            try:
                # One at a time, each confirmed before the next: the broker sees id order.
                await self._bus.publish_raw(row.routing_key, row.payload.encode())
            except BusUnavailableError as exc:
                failed.append(row)
                error = describe(exc)
                self._metrics.outbox_failures.labels("outage").inc()
                # The rest would fail the same way; they keep their turn for the next pass.
                break
            except Exception as exc:
                failed.append(row)
                error = error or describe(exc)
                self._metrics.outbox_failures.labels("refused").inc()
                logger.exception(
                    "outbox: the broker refused event %s (%s); skipped for this pass",
                    row.event_id,
                    row.routing_key,
                )
                continue
            sent.append(row)
        await self._record(sent, failed)
        self._metrics.outbox_published.inc(len(sent))
        report = RelayReport(
            sent=tuple(r.event_id for r in sent),
            failed=tuple(r.event_id for r in failed),
            error=error,
        )
        if self._on_batch is not None:
            try:
                self._on_batch(report)
            except Exception:
                logger.exception("outbox: the on_batch callback failed")
        return report

    async def _record(self, sent: Sequence[_Row], failed: Sequence[_Row]) -> None:
        if not sent and not failed:
            return
        async with self._db.transaction() as conn:
            if sent:
                await conn.execute(
                    update(outbox)
                    # A row another relay stamped first keeps its stamp.
                    .where(outbox.c.id.in_([r.id for r in sent]), outbox.c.sent_at.is_(None))
                    .values(sent_at=datetime.now(UTC), attempts=outbox.c.attempts + 1)
                )
            if failed:
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.id.in_([r.id for r in failed]))
                    .values(attempts=outbox.c.attempts + 1)
                )

    # -- the loops ---------------------------------------------------------------------

    async def _lead_when_possible(self) -> None:
        failures = 0
        while True:
            lease = Lease(self._kv, LEASE_NAME, ttl=self._lease_ttl, owner=self._owner)
            try:
                acquired = await lease.acquire()
            except KeyValueError as exc:
                failures += 1
                if failures == 1:
                    logger.warning("outbox: cannot reach the lease store, relay paused: %s", exc)
                await cancellation.sleep(self._backoff(failures))
                continue
            failures = 0
            if acquired:
                await self._lead(lease)
            await cancellation.sleep(self._poll_interval)

    async def _lead(self, lease: Lease) -> None:
        self._leading = True
        self._metrics.outbox_leader.set(1)
        logger.info("outbox: this replica relays now")
        try:
            await hold(lease, self._relay_forever, renew_every=self._lease_ttl / 3)
        except LeaseLostError as exc:
            logger.warning("outbox: %s; standing by", exc)
        finally:
            self._leading = False
            self._metrics.outbox_leader.set(0)
            try:
                await lease.release()
            except KeyValueError as exc:
                logger.warning("outbox: could not release the lease (it will expire): %s", exc)

    async def _relay_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_purge = loop.time()
        failures = 0
        while True:
            self._wake.clear()
            try:
                await self.drain()
                if loop.time() >= next_purge:
                    next_purge = loop.time() + self._purge_interval
                    await self.purge_sent()
            except (RelayError, DatabaseUnavailableError) as exc:
                failures += 1
                delay = self._backoff(failures)
                logger.warning(
                    "outbox: relay failed (%d in a row), retrying in %.2gs: %s",
                    failures,
                    delay,
                    exc,
                )
                await cancellation.sleep(delay)
                continue
            except Exception:
                # A bug, not an outage: logged with its traceback; the relay lives on.
                failures += 1
                logger.exception("outbox: unexpected relay failure")
                await cancellation.sleep(self._backoff(failures))
                continue
            if failures:
                logger.info("outbox: relaying again after %d failed passes", failures)
                failures = 0
            cancellation.raise_if_cancelled()
            try:
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _listen_for_nudges(self) -> None:
        failures = 0
        while True:
            try:
                async with self._kv.subscribe(NUDGE_CHANNEL) as messages:
                    failures = 0
                    self.listening.set()
                    async for _ in messages:
                        cancellation.raise_if_cancelled()
                        self._wake.set()
            except KeyValueError as exc:
                failures += 1
                if failures == 1:
                    logger.warning("outbox: not listening for nudges, polling only: %s", exc)
            finally:
                self.listening.clear()
            # Whatever ended the subscription, do not spin on a broken store.
            await cancellation.sleep(self._backoff(max(failures, 1)))

    def _backoff(self, failures: int) -> float:
        return float(min(self._backoff_max, self._poll_interval * 2 ** min(failures, 30)))
