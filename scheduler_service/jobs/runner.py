"""Periodic jobs run by one scheduler replica at a time.

Every replica runs a ``JobRunner`` with the same jobs. On each tick of a job a replica:

1. tries to take the job's lease (``lease:job:<name>``); if another replica holds it, the
   tick ends ("busy");
2. checks the job's "done recently" marker (``job-done:<name>``); if it exists, some replica
   ran the job less than ``interval`` ago and the tick ends ("not_due");
3. runs the job while renewing the lease; a failed renewal cancels it ("lost");
4. on success sets the marker to expire after ``interval``, so the cluster as a whole runs
   the job about once per interval however many replicas there are;
5. releases the lease (compare-and-delete), so another replica can run it next time.

Every run that did something (ok, failed, lost) is written to ``job-last-run:<name>``
(a Redis hash: result, items, error, replica, finished_at), so ``status`` shows any
replica's last run and the admin API can say what each timer did and when it is due.

Replicas tick every ``interval / 4`` (but at least every ``max_tick`` s), so a job runs
within about a quarter interval of falling due, and the run of a replica that crashed
midway is taken up at the first tick after its lease expired. A failed run sets no
marker: the next tick tries again. Jobs must be safe to repeat and to cancel at any
await: both happen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from scheduler_service import cancellation
from scheduler_service.jobs.lease import Lease, LeaseLostError, hold, holder_of, replica_name
from scheduler_service.metrics import SchedulerMetrics
from shared.db import DatabaseUnavailableError
from shared.errors import ServiceUnavailableError
from shared.kv import KeyValueError, KeyValueStore

logger = logging.getLogger(__name__)

JobResult = Literal["ok", "failed", "lost", "busy", "not_due"]

DEFAULT_LEASE_TTL = 60.0
DEFAULT_MAX_TICK = 60.0
LAST_RUN_TTL = 7 * 24 * 3600.0


def _last_run_key(name: str) -> str:
    return f"job-last-run:{name}"


@dataclass(frozen=True, slots=True)
class PeriodicJob:
    """``run`` does one pass and returns how many things it removed."""

    name: str
    interval: float
    run: Callable[[], Awaitable[int]]

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("a job's interval must be positive")


@dataclass(frozen=True, slots=True)
class JobStatus:
    """One timer as the whole cluster sees it, read from Redis."""

    name: str
    interval: float
    lease_holder: str | None  # the replica running it now, if any
    last_run: dict[str, str] | None  # result, items, error, replica, finished_at
    next_run_at: datetime | None  # None: due now, at some replica's next tick


@dataclass(frozen=True, slots=True)
class JobRun:
    """The outcome of one tick of one job on this replica."""

    job: str
    result: JobResult
    items: int = 0
    error: str | None = None


class JobRunner:
    """Ticks each job in a named background task of its own; see the module docstring."""

    def __init__(
        self,
        kv: KeyValueStore,
        jobs: Sequence[PeriodicJob],
        *,
        owner: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        max_tick: float = DEFAULT_MAX_TICK,
        metrics: SchedulerMetrics | None = None,
        on_run: Callable[[JobRun], None] | None = None,
    ) -> None:
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"job names must be unique: {names}")
        self._kv = kv
        self._jobs = {job.name: job for job in jobs}
        self._owner = owner
        self._lease_ttl = lease_ttl
        self._max_tick = max_tick
        self._metrics = metrics or SchedulerMetrics()
        self._on_run = on_run
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def jobs(self) -> list[PeriodicJob]:
        return list(self._jobs.values())

    async def status(self) -> list[JobStatus]:
        """Every job's lease holder, last run and next due time (``KeyValueError`` if
        Redis cannot be read)."""
        now = datetime.now(UTC)
        found = []
        for job in self._jobs.values():
            token = await self._kv.get(f"lease:job:{job.name}")
            last = await self._kv.hgetall(_last_run_key(job.name))
            due_in_ms = await self._kv.pttl(f"job-done:{job.name}")
            found.append(
                JobStatus(
                    name=job.name,
                    interval=job.interval,
                    lease_holder=None if token is None else holder_of(token),
                    last_run=last or None,
                    next_run_at=now + timedelta(milliseconds=due_in_ms) if due_in_ms > 0 else None,
                )
            )
        return found

    def start(self) -> None:
        """One task per job, ticking at once and then every quarter interval."""
        if self._tasks:
            raise RuntimeError("the job runner is already running")
        self._tasks = [
            asyncio.create_task(self._loop(job), name=f"scheduler:job:{job.name}")
            for job in self._jobs.values()
        ]

    async def stop(self) -> None:
        """Cancel the ticking tasks (a running job is cancelled, its lease released)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, job: PeriodicJob) -> None:
        tick = min(job.interval / 4, self._max_tick)
        while True:
            await self.tick(job.name)
            await cancellation.sleep(tick)

    async def tick(self, name: str) -> JobRun:
        """One tick of job ``name``: run it if this replica gets the lease and it is due."""
        job = self._jobs[name]
        lease = Lease(self._kv, f"job:{name}", ttl=self._lease_ttl, owner=self._owner)
        try:
            acquired = await lease.acquire()
        except KeyValueError as exc:
            logger.warning("job %s: cannot take its lease: %s", name, exc)
            return self._report(JobRun(name, "failed", error=f"lease: {exc}"))
        if not acquired:
            return self._report(JobRun(name, "busy"))
        try:
            run = self._report(await self._run_holding(job, lease))
            await self._remember(run)
            return run
        finally:
            try:
                await lease.release()
            except KeyValueError as exc:
                # It expires on its own within lease_ttl.
                logger.warning("job %s: could not release its lease: %s", name, exc)

    async def _run_holding(self, job: PeriodicJob, lease: Lease) -> JobRun:
        done_key = f"job-done:{job.name}"
        try:
            # Read under the lease: no other replica can be between this check and the run.
            if await self._kv.exists(done_key):
                return JobRun(job.name, "not_due")
            items = await hold(lease, job.run, renew_every=self._lease_ttl / 3)
            await self._kv.set(done_key, "1", ex=job.interval)
        except LeaseLostError as exc:
            logger.warning("job %s stopped: %s", job.name, exc)
            return JobRun(job.name, "lost", error=str(exc))
        except (ServiceUnavailableError, DatabaseUnavailableError) as exc:
            # An outage, not a bug: no traceback; the next tick tries again.
            logger.warning("job %s failed, a back end is unavailable: %s", job.name, exc)
            return JobRun(job.name, "failed", error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            # Any failure of one pass is logged and retried at the next tick; the loop lives.
            logger.exception("job %s failed", job.name)
            return JobRun(job.name, "failed", error=f"{type(exc).__name__}: {exc}")
        logger.info("job %s done: %d removed", job.name, items, extra={"job": job.name})
        return JobRun(job.name, "ok", items=items)

    async def _remember(self, run: JobRun) -> None:
        """Write a run that did something where every replica's ``status`` reads it."""
        if run.result not in ("ok", "failed", "lost"):
            return
        finished = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        try:
            key = _last_run_key(run.job)
            await self._kv.hset(
                key,
                {
                    "result": run.result,
                    "items": run.items,
                    "error": run.error or "",
                    "replica": self._owner or replica_name(),
                    "finished_at": finished,
                },
            )
            # Outlives any interval worth showing; a job removed from the code goes away.
            await self._kv.expire(key, LAST_RUN_TTL)
        except KeyValueError as exc:
            logger.warning("job %s: could not record its last run: %s", run.job, exc)

    def _report(self, run: JobRun) -> JobRun:
        self._metrics.job_runs.labels(run.job, run.result).inc()
        if run.result == "ok":
            self._metrics.job_items.labels(run.job).inc(run.items)
            self._metrics.job_last_success.labels(run.job).set(time.time())
        if self._on_run is not None:
            try:
                self._on_run(run)
            except Exception:
                logger.exception("job %s: the on_run callback failed", run.job)
        return run
