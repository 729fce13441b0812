"""The scheduler's own Prometheus series, registered in the app's registry.

Beside the HTTP series every app has (``shared.web.HttpMetrics``), an operator watching
the scheduler wants to see: messages settled per queue (handled, retried, parked),
duplicates skipped, queue depths, the outbox relay's progress and failures, and which
timer ran where and when it last succeeded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class SchedulerMetrics:
    """Every scheduler series, in ``registry`` (a fresh one when None: tests, tools)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # -- consumers ---------------------------------------------------------------
        self.messages = Counter(
            "vod_scheduler_messages_total",
            "Deliveries settled, by queue and result (acked, retried, parked, requeued)",
            ["queue", "result"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "vod_scheduler_duplicate_messages_total",
            "Deliveries acked without work because their message id was already processed",
            ["queue"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "vod_scheduler_queue_depth",
            "Messages waiting in a consumer's queue (ready) or its parking queue (parked)",
            ["queue", "state"],
            registry=self.registry,
        )
        # -- outbox relay ------------------------------------------------------------
        self.outbox_published = Counter(
            "vod_outbox_published_total",
            "Outbox rows published with a confirm and stamped sent",
            registry=self.registry,
        )
        self.outbox_failures = Counter(
            "vod_outbox_publish_failures_total",
            "Failed publish attempts of outbox rows, by reason (outage, refused)",
            ["reason"],
            registry=self.registry,
        )
        self.outbox_purged = Counter(
            "vod_outbox_purged_total",
            "Sent outbox rows deleted after the retention period",
            registry=self.registry,
        )
        self.outbox_leader = Gauge(
            "vod_outbox_relay_leader",
            "1 while this replica holds the outbox relay's lease",
            registry=self.registry,
        )
        # -- timers ------------------------------------------------------------------
        self.job_runs = Counter(
            "vod_scheduler_job_runs_total",
            "Timer ticks by job and result (ok, failed, lost, busy, not_due)",
            ["job", "result"],
            registry=self.registry,
        )
        self.job_items = Counter(
            "vod_scheduler_job_items_total",
            "Things a timer job removed (chunks, blobs)",
            ["job"],
            registry=self.registry,
        )
        self.job_last_success = Gauge(
            "vod_scheduler_job_last_success_timestamp_seconds",
            "Unix time of the last successful run of a job on this replica",
            ["job"],
            registry=self.registry,
        )
