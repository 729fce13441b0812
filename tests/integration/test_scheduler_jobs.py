"""Leases, the periodic-job runner, the abandoned-upload sweeper and the blob collector,
on the embedded back ends and on MariaDB + Redis.

Concurrency is driven by hand: a job blocks on an event, and a second runner's tick is
run while it does. Lease expiry is waited for through what a runner reports, never by
sleeping.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from scheduler_service.jobs.blob_collector import BlobCollector
from scheduler_service.jobs.lease import Lease
from scheduler_service.jobs.runner import JobRun, JobRunner, PeriodicJob
from scheduler_service.jobs.upload_sweeper import AbandonedUploadSweeper
from scheduler_service.metrics import SchedulerMetrics
from shared.db.schema import blobs as blobs_table
from shared.layout import chunk_key, content_blob_key, thumbnail_key, upload_state_key
from shared.settings import Settings
from tests.integration.test_scheduler_backends import (
    BACKEND_KINDS,
    WAIT,
    Backends,
    Waiter,
    open_backends,
)


@pytest.fixture(params=BACKEND_KINDS)
async def backends(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> AsyncIterator[Backends]:
    async with open_backends(request, make_settings) as opened:
        yield opened


# --- leases ---------------------------------------------------------------------


async def test_a_lease_is_exclusive_and_only_its_holder_renews_or_releases_it(
    backends: Backends,
) -> None:
    mine = Lease(backends.kv, "exclusive", ttl=5.0, owner="me")
    theirs = Lease(backends.kv, "exclusive", ttl=5.0, owner="them")

    assert await mine.acquire()
    assert not await theirs.acquire()
    assert not await theirs.renew()
    assert not await theirs.release()
    assert await mine.holder() == mine.token

    await backends.kv.expire(mine.key, 0.5)
    assert await mine.renew()
    assert await backends.kv.pttl(mine.key) > 4000

    assert await mine.release()
    assert await mine.holder() is None
    assert not await mine.renew()
    assert await theirs.acquire()
    # Tokens differ even for one owner name: a new attempt never inherits an old lease.
    assert Lease(backends.kv, "exclusive", ttl=1.0, owner="me").token != mine.token


# --- the runner -------------------------------------------------------------------


class BlockingJob:
    """A job that reports when it starts and runs until released."""

    def __init__(self) -> None:
        self.running = 0
        self.most_running = 0
        self.runs = 0
        self.cancelled = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    async def run(self) -> int:
        self.running += 1
        self.runs += 1
        self.most_running = max(self.most_running, self.running)
        self.started.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return 1


def runner(
    backends: Backends,
    job: PeriodicJob,
    owner: str,
    *,
    lease_ttl: float = 60.0,
    metrics: SchedulerMetrics | None = None,
) -> tuple[JobRunner, Waiter]:
    """A runner of ``job`` as replica ``owner``, and what it reports of each tick."""
    runs = Waiter()
    made = JobRunner(
        backends.kv, [job], owner=owner, lease_ttl=lease_ttl, metrics=metrics, on_run=runs.add
    )
    return made, runs


def results(runs: Waiter) -> list[str]:
    return [run.result for run in runs.items]


async def test_two_runners_never_run_a_job_at_once(backends: Backends) -> None:
    job = BlockingJob()
    periodic = PeriodicJob("exclusive", 60.0, job.run)
    first, first_runs = runner(backends, periodic, "a")
    second, second_runs = runner(backends, periodic, "b")

    running = asyncio.create_task(first.tick("exclusive"))
    await asyncio.wait_for(job.started.wait(), WAIT)
    assert (await second.tick("exclusive")).result == "busy"
    job.gate.set()
    assert (await asyncio.wait_for(running, WAIT)).result == "ok"

    # Done a moment ago somewhere: not due again on any replica until the interval passes.
    assert (await second.tick("exclusive")).result == "not_due"
    assert (await first.tick("exclusive")).result == "not_due"
    assert job.runs == 1
    assert job.most_running == 1
    assert results(first_runs) == ["ok", "not_due"]
    assert results(second_runs) == ["busy", "not_due"]


async def test_an_expired_lease_lets_another_runner_take_over(backends: Backends) -> None:
    job = BlockingJob()
    job.gate.set()
    crashed = Lease(backends.kv, "job:orphaned", ttl=0.3, owner="crashed")
    assert await crashed.acquire()
    loop = asyncio.get_running_loop()
    taken = loop.time()
    # Ticks every 10 ms: it keeps finding the lease taken until it expires.
    survivor, runs = runner(backends, PeriodicJob("orphaned", 0.04, job.run), "survivor")

    survivor.start()
    try:
        await runs.until(lambda: "ok" in results(runs))
    finally:
        await survivor.stop()

    assert results(runs)[0] == "busy"
    assert loop.time() - taken >= 0.25
    assert job.runs >= 1


async def test_a_job_that_loses_its_lease_is_cancelled(backends: Backends) -> None:
    job = BlockingJob()
    # Renewed every 50 ms.
    holder, _ = runner(backends, PeriodicJob("stolen", 60.0, job.run), "a", lease_ttl=0.15)
    running = asyncio.create_task(holder.tick("stolen"))
    await asyncio.wait_for(job.started.wait(), WAIT)

    # The lease expired and another replica took it (as after a long stall).
    await backends.kv.set("lease:job:stolen", "b:other-token", ex=5.0)
    run = await asyncio.wait_for(running, WAIT)

    assert run.result == "lost"
    assert job.cancelled == 1
    # The other replica's lease is left alone.
    assert await backends.kv.get("lease:job:stolen") == "b:other-token"


async def test_a_failed_run_is_retried_at_the_next_tick(backends: Backends) -> None:
    attempts: list[int] = []

    async def flaky() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("blob store hiccup")
        return 3

    metrics = SchedulerMetrics()
    only, _ = runner(backends, PeriodicJob("flaky", 60.0, flaky), "a", metrics=metrics)

    failed = await only.tick("flaky")
    assert (failed.result, failed.error) == ("failed", "RuntimeError: blob store hiccup")
    assert await only.tick("flaky") == JobRun("flaky", "ok", items=3)
    assert await backends.kv.get("lease:job:flaky") is None

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("vod_scheduler_job_runs_total", job="flaky", result="failed") == 1
    assert value("vod_scheduler_job_runs_total", job="flaky", result="ok") == 1
    assert value("vod_scheduler_job_items_total", job="flaky") == 3
    last_success = value("vod_scheduler_job_last_success_timestamp_seconds", job="flaky")
    assert last_success is not None
    assert abs(last_success - time.time()) < 60


async def test_the_runner_ticks_until_stopped(backends: Backends) -> None:
    job = BlockingJob()
    job.gate.set()
    ticking, runs = runner(backends, PeriodicJob("ticking", 0.02, job.run), "a")

    ticking.start()
    await runs.until(lambda: results(runs).count("ok") >= 2)
    await ticking.stop()

    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("scheduler:job:")]
    assert await backends.kv.get("lease:job:ticking") is None


# --- the abandoned-upload sweeper -------------------------------------------------


async def put(backends: Backends, key: str, data: bytes = b"chunk") -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield data

    await backends.blobs.write(key, chunks())


async def keys(backends: Backends, prefix: str = "") -> list[str]:
    return [key async for key in backends.blobs.list(prefix)]


def age(backends: Backends, key: str, delta: timedelta) -> None:
    """Make the blob ``key`` look ``delta`` older (the local store keeps mtimes)."""
    path = backends.blobs.local_path(key)
    assert path is not None
    stamp = (datetime.now(UTC) - delta).timestamp()
    os.utime(path, (stamp, stamp))


async def test_the_sweeper_deletes_chunks_of_abandoned_uploads_only(backends: Backends) -> None:
    live, abandoned, fresh = "live01", "dead01", "fresh01"
    for upload_id in (live, abandoned, fresh):
        for index in range(3):
            await put(backends, chunk_key(upload_id, index))
    for upload_id in (live, abandoned):
        for index in range(3):
            age(backends, chunk_key(upload_id, index), timedelta(hours=2))
    await backends.kv.hset(upload_state_key(live), {"owner_id": "u1", "total_chunks": 3})
    stored = content_blob_key("ab" * 32)
    await put(backends, stored, b"a whole file")
    # Not an upload folder: left alone.
    await put(backends, "uploads/README")
    sweeper = AbandonedUploadSweeper(backends.blobs, backends.kv, min_age=timedelta(hours=1))

    assert await sweeper.run() == 3

    assert await keys(backends) == sorted(
        [
            stored,
            "uploads/README",
            *(chunk_key(fresh, i) for i in range(3)),
            *(chunk_key(live, i) for i in range(3)),
        ]
    )
    # Safe to repeat: nothing more to do.
    assert await sweeper.run() == 0


async def test_the_sweeper_without_an_age_guard_takes_every_abandoned_chunk(
    backends: Backends,
) -> None:
    await put(backends, chunk_key("dead02", 0))
    await put(backends, chunk_key("live02", 0))
    await backends.kv.hset(upload_state_key("live02"), {"owner_id": "u1"})

    assert (
        await AbandonedUploadSweeper(backends.blobs, backends.kv, min_age=timedelta(0)).run() == 1
    )

    assert await keys(backends, "uploads/") == [chunk_key("live02", 0)]


# --- the blob collector -----------------------------------------------------------


async def stored_blob(
    backends: Backends, *, ref_count: int, zero_since: datetime | None, thumbnail: bool = True
) -> str:
    content_hash = secrets.token_hex(32)
    backends.content_hashes.add(content_hash)
    await put(backends, content_blob_key(content_hash), b"video bytes")
    if thumbnail:
        await put(backends, thumbnail_key(content_hash), b"jpeg")
    async with backends.db.transaction() as conn:
        await conn.execute(
            blobs_table.insert().values(
                content_hash=content_hash,
                size=11,
                ref_count=ref_count,
                created_at=datetime.now(UTC) - timedelta(days=3),
                zero_since=zero_since,
            )
        )
    return content_hash


async def blob_rows(backends: Backends, hashes: list[str]) -> set[str]:
    async with backends.db.connect() as conn:
        result = await conn.execute(
            select(blobs_table.c.content_hash).where(blobs_table.c.content_hash.in_(hashes))
        )
        return {row.content_hash for row in result}


async def files_of(backends: Backends, content_hash: str) -> list[str]:
    found = []
    for key in (content_blob_key(content_hash), thumbnail_key(content_hash)):
        if await backends.blobs.stat(key) is not None:
            found.append(key)
    return found


async def test_the_collector_deletes_only_blobs_unreferenced_past_the_grace(
    backends: Backends,
) -> None:
    now = datetime.now(UTC)
    expired = await stored_blob(backends, ref_count=0, zero_since=now - timedelta(hours=25))
    recent = await stored_blob(backends, ref_count=0, zero_since=now - timedelta(hours=1))
    referenced = await stored_blob(backends, ref_count=2, zero_since=None)
    never_zero = await stored_blob(backends, ref_count=0, zero_since=None)
    file_gone = await stored_blob(
        backends, ref_count=0, zero_since=now - timedelta(days=3), thumbnail=False
    )
    await backends.blobs.delete(content_blob_key(file_gone))
    everything = [expired, recent, referenced, never_zero, file_gone]
    # A batch of one: the collector must go on to the next batch by itself.
    collector = BlobCollector(backends.db, backends.blobs, grace=timedelta(hours=24), batch_size=1)

    assert await collector.run() == 2

    assert await blob_rows(backends, everything) == {recent, referenced, never_zero}
    assert await files_of(backends, expired) == []
    assert await files_of(backends, file_gone) == []
    for kept in (recent, referenced, never_zero):
        assert await files_of(backends, kept) == [content_blob_key(kept), thumbnail_key(kept)]
    assert await collector.run() == 0


async def test_the_collector_keeps_a_blob_that_gains_a_reference_meanwhile(
    backends: Backends,
) -> None:
    content_hash = await stored_blob(
        backends, ref_count=0, zero_since=datetime.now(UTC) - timedelta(days=2)
    )
    collector = BlobCollector(backends.db, backends.blobs, grace=timedelta(hours=24))
    cutoff = datetime.now(UTC) - timedelta(hours=24)
    assert await collector.candidates(cutoff) == [content_hash]

    # A new video takes the blob between the listing and the deletion.
    async with backends.db.transaction() as conn:
        await conn.execute(
            blobs_table.update()
            .where(blobs_table.c.content_hash == content_hash)
            .values(ref_count=1, zero_since=None)
        )

    assert not await collector.collect(content_hash, cutoff)
    assert await blob_rows(backends, [content_hash]) == {content_hash}
    assert len(await files_of(backends, content_hash)) == 2
