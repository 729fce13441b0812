"""The scheduler's danmaku consumer: batched inserts, each danmaku exactly once even when
its message is delivered again, bad payloads parked (embedded and MariaDB + RabbitMQ)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import delete, func, select

from scheduler_service.consumers.base import ConsumerGroup
from scheduler_service.consumers.danmaku import DanmakuBatcher
from shared.bus import Event
from shared.db import new_id
from shared.db.schema import danmaku, processed_messages, users, videos
from shared.events import DANMAKU_CREATED
from shared.settings import Settings
from tests.integration.test_scheduler_backends import (
    BACKEND_KINDS,
    Backends,
    Recorder,
    open_backends,
)
from tests.rows import add_video

FAST_RETRY = (0.02, 0.05)
BATCH = 50


@pytest.fixture(params=BACKEND_KINDS)
async def backends(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> AsyncIterator[Backends]:
    async with open_backends(request, make_settings) as opened:
        yield opened


@pytest.fixture
async def video_ids(backends: Backends) -> AsyncIterator[tuple[str, str]]:
    """A live video and a soft-deleted one, removed with their danmaku afterwards."""
    live_owner, live = await add_video(backends.db)
    deleted_owner, deleted = await add_video(backends.db, deleted=True)
    yield live, deleted
    async with backends.db.transaction() as conn:
        await conn.execute(delete(danmaku).where(danmaku.c.video_id.in_([live, deleted])))
        owners = [live_owner, deleted_owner]
        await conn.execute(delete(videos).where(videos.c.owner_id.in_(owners)))
        await conn.execute(delete(users).where(users.c.id.in_(owners)))


def created(video_id: str, offset: int, **overrides: Any) -> Event:
    data = {
        "id": new_id(),
        "video_id": video_id,
        "author_id": "01AUTHOR000000000000000000",
        "offset_ms": offset,
        "content": f"d{offset}",
        "mode": "scroll",
        "color": "#ffffff",
        "created_at": datetime.now(UTC).isoformat(),
        "hidden": False,
    } | overrides
    return Event.new(DANMAKU_CREATED, data)


class FailingOnce(DanmakuBatcher):
    """A batcher whose first write fails (the database blinked): its messages come back."""

    failed = False

    async def _insert(self, batch: Any) -> int:
        if not self.failed:
            self.failed = True
            raise ConnectionError("the database went away")
        return await super()._insert(batch)


async def run_consumer(
    backends: Backends, batcher: DanmakuBatcher, recorder: Recorder
) -> ConsumerGroup:
    group = ConsumerGroup(backends.db, backends.bus, on_outcome=recorder.outcome)
    queue = backends.queue(f"danmaku-{secrets.token_hex(3)}")
    group.register_raw(
        queue, [DANMAKU_CREATED], batcher.handle, prefetch=BATCH * 2, retry_delays=FAST_RETRY
    )
    await group.start()
    return group


async def count_rows(backends: Backends, video_id: str) -> int:
    async with backends.db.connect() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count()).select_from(danmaku).where(danmaku.c.video_id == video_id)
                )
            ).scalar_one()
        )


async def test_batched_exactly_once_across_redelivery(
    backends: Backends, video_ids: tuple[str, str]
) -> None:
    live, deleted = video_ids
    recorder = Recorder()
    batcher = FailingOnce(backends.db, batch_size=BATCH, max_wait=0.05)
    group = await run_consumer(backends, batcher, recorder)
    try:
        events = [created(live, i) for i in range(120)]
        await backends.bus.publish_many(events)
        await recorder.until(lambda: len(recorder.results("acked")) >= len(events))
        assert await count_rows(backends, live) == len(events)
        assert batcher.failed  # the first batch failed and was delivered again
        assert len(recorder.results("retried")) >= 1
        # Batched: far fewer transactions than messages.
        assert sum(batcher.batches_written) == len(events)
        assert len(batcher.batches_written) < len(events) / 4

        # The same messages again (a redelivery after a lost ack), one twice in a batch,
        # a danmaku of a deleted video, and a payload that breaks the rules.
        again = [*events[:10], events[0]]
        bad = created(live, -5)
        late = created(deleted, 1)
        await backends.bus.publish_many([*again, late, bad])
        await recorder.until(lambda: len(recorder.results("parked")) == 1)
        await recorder.until(lambda: len(recorder.results("acked")) >= len(events) + len(again) + 1)
        assert await count_rows(backends, live) == len(events)
        assert await count_rows(backends, deleted) == 0
        async with backends.db.connect() as conn:
            recorded = (
                await conn.execute(
                    select(func.count())
                    .select_from(processed_messages)
                    .where(processed_messages.c.message_id.in_([e.id for e in events]))
                )
            ).scalar_one()
        assert recorded == len(events)
        parked = await backends.bus.parked(group.queues[0])
        assert [e.id for e in parked] == [bad.id]
    finally:
        await group.close(grace=1.0)
