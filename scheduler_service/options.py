"""How often and how much the scheduler's background work does, with production defaults.

Not environment variables (yet): the defaults suit any deployment, and tests pass their
own, far shorter, through ``create_app(settings, options=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from scheduler_service.consumers.base import DEFAULT_DEPTH_INTERVAL
from scheduler_service.jobs import blob_collector, outbox_relay, runner, upload_sweeper


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerOptions:
    # The outbox relay (scheduler_service.jobs.outbox_relay).
    relay_poll_interval: float = outbox_relay.DEFAULT_POLL_INTERVAL
    relay_batch_size: int = outbox_relay.DEFAULT_BATCH_SIZE
    relay_lease_ttl: float = outbox_relay.DEFAULT_LEASE_TTL
    relay_backoff_max: float = outbox_relay.DEFAULT_BACKOFF_MAX
    outbox_retention: timedelta = outbox_relay.DEFAULT_RETENTION
    outbox_purge_interval: float = outbox_relay.DEFAULT_PURGE_INTERVAL
    # Consumers: how often queue depths are read from the broker into /metrics.
    queue_depth_interval: float = DEFAULT_DEPTH_INTERVAL
    # Timers (scheduler_service.jobs.runner) and their jobs.
    job_lease_ttl: float = runner.DEFAULT_LEASE_TTL
    upload_sweep_interval: float = 15 * 60.0
    upload_chunk_min_age: timedelta = upload_sweeper.DEFAULT_MIN_AGE
    blob_collect_interval: float = 60 * 60.0
    blob_grace: timedelta = blob_collector.DEFAULT_GRACE
    # Deletions whose message gave up (parked) or whose scheduler died are resumed by a
    # timer once nobody advanced them for deletion_stale_after.
    deletion_resume_interval: float = 60.0
    deletion_stale_after: timedelta = timedelta(minutes=5)
