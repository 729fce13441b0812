"""The scheduler service's application factory. No I/O here: back ends open in cleanup_ctx.

After the back ends, in this order (and closed in the reverse one):

1. ``relay_ctx``     the outbox relay (publishes what other services committed);
2. ``consumers_ctx`` the consumers of ``scheduler_service.consumers.CONSUMERS``;
3. ``jobs_ctx``      the timers: abandoned uploads, unreferenced blobs.

So on shutdown the timers stop first, then the consumers finish their messages (within the
shutdown grace), then the relay releases its lease, and only then the back ends close.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from scheduler_service.consumers import CONSUMERS
from scheduler_service.consumers.base import Backends, ConsumerGroup, ConsumerRegistrar
from scheduler_service.jobs.blob_collector import BlobCollector
from scheduler_service.jobs.outbox_relay import OutboxRelay
from scheduler_service.jobs.runner import JobRunner, PeriodicJob
from scheduler_service.jobs.upload_sweeper import AbandonedUploadSweeper
from scheduler_service.keys import (
    ADMIN,
    CONSUMER_GROUP,
    JOB_RUNNER,
    OPTIONS,
    RELAY,
    SCHEDULER_METRICS,
)
from scheduler_service.metrics import SchedulerMetrics
from scheduler_service.options import SchedulerOptions
from scheduler_service.repositories.deletions import DeletionRepository
from scheduler_service.routes import setup_routes
from scheduler_service.services.admin import AdminService
from scheduler_service.services.deletions import VideoDeletionRunner
from shared.resources import BLOBS, BUS, DB, KV, blobs_ctx, bus_ctx, database_ctx, kv_ctx
from shared.settings import Settings
from shared.web import METRICS, SETTINGS, CleanupContext, create_base_app

SERVICE = "scheduler"
# Dependency order: what a later context uses is opened by an earlier one.
BACKEND_CONTEXTS: tuple[CleanupContext, ...] = (database_ctx, kv_ctx, bus_ctx, blobs_ctx)

UPLOAD_SWEEPER_JOB = "abandoned-uploads"
BLOB_COLLECTOR_JOB = "unreferenced-blobs"
DELETION_RESUME_JOB = "stalled-deletions"


@asynccontextmanager
async def _background(name: str, work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``work`` as a named task for the duration of the block; cancel and await it."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    options = app[OPTIONS]
    relay = OutboxRelay(
        app[DB],
        app[BUS],
        app[KV],
        batch_size=options.relay_batch_size,
        poll_interval=options.relay_poll_interval,
        lease_ttl=options.relay_lease_ttl,
        backoff_max=options.relay_backoff_max,
        retention=options.outbox_retention,
        purge_interval=options.outbox_purge_interval,
        metrics=app[SCHEDULER_METRICS],
    )
    app[RELAY] = relay
    async with _background("scheduler:outbox-relay", relay.run()):
        yield


def consumers_ctx(registrars: Sequence[ConsumerRegistrar]) -> CleanupContext:
    """The context that registers ``registrars``' consumers, starts and closes them."""

    async def consumers_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        group = ConsumerGroup(
            app[DB],
            app[BUS],
            metrics=app[SCHEDULER_METRICS],
            depth_interval=app[OPTIONS].queue_depth_interval,
            kv=app[KV],
        )
        backends = Backends(
            settings=settings,
            db=app[DB],
            kv=app[KV],
            bus=app[BUS],
            blobs=app[BLOBS],
            blob_grace=app[OPTIONS].blob_grace,
        )
        for register in registrars:
            register(group, backends)
        app[CONSUMER_GROUP] = group
        await group.start()
        try:
            yield
        finally:
            await group.close(grace=settings.shutdown_timeout)

    return consumers_ctx


async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    options = app[OPTIONS]
    sweeper = AbandonedUploadSweeper(app[BLOBS], app[KV], min_age=options.upload_chunk_min_age)
    collector = BlobCollector(app[DB], app[BLOBS], grace=options.blob_grace)
    deletions = VideoDeletionRunner(app[DB], app[KV], collector)

    async def resume_deletions() -> int:
        return await deletions.resume_pending(stale_after=options.deletion_stale_after)

    runner = JobRunner(
        app[KV],
        [
            PeriodicJob(UPLOAD_SWEEPER_JOB, options.upload_sweep_interval, sweeper.run),
            PeriodicJob(BLOB_COLLECTOR_JOB, options.blob_collect_interval, collector.run),
            PeriodicJob(DELETION_RESUME_JOB, options.deletion_resume_interval, resume_deletions),
        ],
        lease_ttl=options.job_lease_ttl,
        metrics=app[SCHEDULER_METRICS],
    )
    app[JOB_RUNNER] = runner
    app[ADMIN] = AdminService(
        db=app[DB],
        kv=app[KV],
        bus=app[BUS],
        group=app[CONSUMER_GROUP],
        jobs=runner,
        deletions=DeletionRepository(app[DB]),
    )
    runner.start()
    try:
        yield
    finally:
        await runner.stop()


def create_app(
    settings: Settings,
    *,
    contexts: Sequence[CleanupContext] = BACKEND_CONTEXTS,
    consumers: Sequence[ConsumerRegistrar] = CONSUMERS,
    options: SchedulerOptions | None = None,
) -> web.Application:
    """The scheduler service. ``contexts`` is the test seam for the back ends (fakes must
    provide DB, KV, BUS and BLOBS); ``consumers`` and ``options`` the one for its work."""
    app = create_base_app(SERVICE, settings)
    app[OPTIONS] = options or SchedulerOptions()
    app[SCHEDULER_METRICS] = SchedulerMetrics(app[METRICS].registry)
    app.cleanup_ctx.extend([*contexts, relay_ctx, consumers_ctx(consumers), jobs_ctx])
    setup_routes(app)
    return app
