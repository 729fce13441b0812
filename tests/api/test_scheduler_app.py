"""The scheduler's factory, wired end to end on the embedded back ends.

An event committed to the outbox by "another service" is relayed by the app's relay,
handled by a consumer registered through ``create_app(consumers=...)``, and counted on
``/metrics``; on shutdown every background task stops and the relay's lease is released.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_service.app import (
    BLOB_COLLECTOR_JOB,
    DELETION_RESUME_JOB,
    UPLOAD_SWEEPER_JOB,
    create_app,
)
from scheduler_service.consumers.base import Backends, ConsumerGroup
from scheduler_service.jobs.outbox_relay import LEASE_NAME
from scheduler_service.keys import CONSUMER_GROUP, JOB_RUNNER, RELAY
from scheduler_service.options import SchedulerOptions
from shared.bus import Event, Outcome
from shared.kv import open_kv
from shared.outbox import add_event
from shared.resources import DB
from shared.settings import Settings

FAST = SchedulerOptions(relay_poll_interval=0.02, relay_backoff_max=0.05, relay_lease_ttl=5.0)
WAIT = 10.0


class Probe:
    """A consumer registered through the factory; tells when its message is acked."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.acked = asyncio.Event()

    def register(self, group: ConsumerGroup, _backends: Backends) -> None:
        group.register("app-probe", ["app.#"], self.handle, retry_delays=(0.02,))
        group.add_outcome_listener(self.outcome)

    async def handle(self, _conn: AsyncConnection, event: Event) -> None:
        self.events.append(event)

    def outcome(self, outcome: Outcome) -> None:
        if outcome.result == "acked":
            self.acked.set()


async def test_an_outbox_event_is_relayed_consumed_and_counted(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    probe = Probe()
    app = create_app(make_settings(), consumers=[probe.register], options=FAST)
    client = await aiohttp_client(app)
    event = Event.new("app.hello", {"n": 1})

    async with app[DB].transaction() as conn:
        await add_event(conn, event)
    await asyncio.wait_for(probe.acked.wait(), WAIT)

    assert probe.events == [event]
    assert app[CONSUMER_GROUP].queues == ["app-probe"]
    assert {job.name for job in app[JOB_RUNNER].jobs} == {
        UPLOAD_SWEEPER_JOB,
        BLOB_COLLECTOR_JOB,
        DELETION_RESUME_JOB,
    }
    response = await client.get("/metrics")
    assert response.status == 200
    metrics = await response.text()
    assert 'vod_scheduler_messages_total{queue="app-probe",result="acked"} 1.0' in metrics
    assert "vod_outbox_relay_leader 1.0" in metrics
    for family in (
        "vod_outbox_published_total",
        "vod_outbox_publish_failures_total",
        "vod_scheduler_queue_depth",
        "vod_scheduler_job_runs_total",
        "vod_http_requests_total",
    ):
        assert f"# TYPE {family.removesuffix('_total')}" in metrics


async def test_shutdown_stops_every_background_task_and_releases_the_relay_lease(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    probe = Probe()
    app = create_app(settings, consumers=[probe.register], options=FAST)
    client = await aiohttp_client(app)
    # Once an event went through, the relay holds its lease.
    async with app[DB].transaction() as conn:
        await add_event(conn, Event.new("app.hello", {}))
    await asyncio.wait_for(probe.acked.wait(), WAIT)
    assert app[RELAY].leading
    kv = await open_kv(settings.redis_url, settings.namespace)
    try:
        assert await kv.get(f"lease:{LEASE_NAME}") is not None

        await client.close()

        left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("scheduler:")]
        assert left == []
        assert await kv.get(f"lease:{LEASE_NAME}") is None
    finally:
        await kv.delete_namespace()
        await kv.close()
