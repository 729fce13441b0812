"""The scheduler as a real process on MariaDB and RabbitMQ, killed or cut off mid-work.

- **Killed mid-batch**: a danmaku batch is held in flight (its transaction waits on a row
  lock the test holds) while other batches commit around it; the scheduler is SIGKILLed,
  a new one started: every danmaku is in the database exactly once.
- **Broker restarted** under 1,000 deletions in flight (a private RabbitMQ node, never the
  shared one): every video is deleted exactly once in effect, nothing is parked.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from sqlalchemy import func, select, text

from scheduler_service.consumers.danmaku import QUEUE as DANMAKU_QUEUE
from scheduler_service.consumers.deletions import QUEUE as DELETIONS_QUEUE
from scheduler_service.services.deletions import STEPS
from shared.bus import Event, MessageBus, open_bus
from shared.db import Database, new_id, open_database
from shared.db.schema import (
    blobs,
    comments,
    danmaku,
    processed_messages,
    video_deletions,
    videos,
)
from shared.events import DANMAKU_CREATED, VIDEO_DELETED
from tests.e2e.processes import ServiceSuite, services_env
from tests.integration.test_bus_contract import TcpProxy
from tests.private_servers import RabbitMQServer
from tests.rows import add_video

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

WAIT = 60.0  # upper bound for a step; a healthy run needs a few seconds in all
POLL = 0.05  # the other process's progress can only be observed by looking again
# Longer than the 0.1 s for which InnoDB serves INNODB_TRX from a cache after each read:
# polled more often, the lock view never shows a wait that began after the first look.
INNODB_TRX_IDLE = 0.2


async def poll(
    what: str, check: Callable[[], Awaitable[bool]], limit: float = WAIT, every: float = POLL
) -> None:
    """Wait until ``check()`` holds: the scheduler is another process, so look again."""
    try:
        async with asyncio.timeout(limit):
            while True:
                if await check():
                    return
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


SCHEDULER = "scheduler_service"


@pytest.fixture
async def suite(tmp_path: Path, real_backends_env: dict[str, str]) -> AsyncIterator[ServiceSuite]:
    """Scheduler processes on the real back ends (only the scheduler is started here)."""
    started = ServiceSuite(services_env(real_backends_env, tmp_path / "blobs"), tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def danmaku_event(video_id: str, author_id: str, offset: int) -> Event:
    return Event.new(
        DANMAKU_CREATED,
        {
            "id": new_id(),
            "video_id": video_id,
            "author_id": author_id,
            "offset_ms": offset,
            "content": f"d{offset}",
            "mode": "scroll",
            "color": "#ffffff",
            "created_at": datetime.now(UTC).isoformat(),
            "hidden": False,
        },
    )


async def danmaku_ids(db: Database, video_id: str) -> list[str]:
    async with db.connect() as conn:
        return list(
            (await conn.execute(select(danmaku.c.id).where(danmaku.c.video_id == video_id)))
            .scalars()
            .all()
        )


async def lock_waits(db: Database, database_name: str) -> int:
    """Transactions of this test's database waiting for a row lock (MariaDB's own view)."""
    async with db.connect() as conn:
        return int(
            (
                await conn.execute(
                    text(
                        "SELECT COUNT(*) FROM information_schema.INNODB_TRX t"
                        " JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id"
                        " WHERE t.trx_state = 'LOCK WAIT' AND p.DB = :db"
                    ),
                    {"db": database_name},
                )
            ).scalar_one()
        )


@pytest.fixture
async def db(suite: ServiceSuite) -> AsyncIterator[Database]:
    opened = await open_database(suite.env["VOD_DB_URL"])
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def bus(suite: ServiceSuite) -> AsyncIterator[MessageBus]:
    opened = await open_bus(suite.env["VOD_AMQP_URL"], suite.env["VOD_NAMESPACE"])
    try:
        yield opened
    finally:
        await opened.delete_namespace([DANMAKU_QUEUE, "video-deletions", "media"])
        await opened.close()


async def test_a_scheduler_killed_mid_batch_loses_and_doubles_no_danmaku(
    suite: ServiceSuite, db: Database, bus: MessageBus
) -> None:
    author_id, video_id = await add_video(db)
    events = [danmaku_event(video_id, author_id, offset) for offset in range(1000)]
    # The first scheduler reaches RabbitMQ through a relay the test can hold, so that
    # batches commit while their acks never reach the broker.
    target = urlsplit(suite.env["VOD_AMQP_URL"])
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    direct_url = suite.env["VOD_AMQP_URL"]
    suite.env["VOD_AMQP_URL"] = target._replace(
        netloc=f"{target.username}:{target.password}@127.0.0.1:{proxy.port}"
    ).geturl()
    try:
        first = await suite.start(SCHEDULER)
    finally:
        suite.env["VOD_AMQP_URL"] = direct_url
    # Some batches committed and acked before anything goes wrong.
    await bus.publish_many(events[:300])

    async def first_persisted() -> bool:
        return len(await danmaku_ids(db, video_id)) == 300

    await poll("the first 300 danmaku", first_persisted)

    # From here the scheduler's acks stay in the relay. The batches before event 500
    # commit (their messages unacked); the batch carrying event 500 stays in flight: the
    # test inserted that message's processed_messages row first and does not commit, so
    # the scheduler's insert of the same key waits on the row lock, its transaction open.
    database_name = urlsplit(suite.env["VOD_DB_URL"]).path.strip("/")
    proxy.hold_upstream()
    async with db.connect() as blocker:
        await blocker.execute(
            processed_messages.insert().values(
                consumer=DANMAKU_QUEUE, message_id=events[500].id, processed_at=datetime.now(UTC)
            )
        )
        await bus.publish_many(events[300:])

        async def committed_and_in_flight() -> bool:
            return (
                len(await danmaku_ids(db, video_id)) > 300
                and await lock_waits(db, database_name) > 0
            )

        await poll(
            "a committed batch and one waiting on the lock",
            committed_and_in_flight,
            every=INNODB_TRX_IDLE,
        )
        first.popen.kill()
        first.popen.wait()
        # The broker learns of the death now: every message it had not seen acked
        # (committed or not) goes back to the queue.
        await proxy.cut()
        persisted_at_kill = len(await danmaku_ids(db, video_id))
        await blocker.rollback()
    assert 300 < persisted_at_kill < len(events)

    await suite.start(SCHEDULER)

    acked_line = f'vod_scheduler_messages_total{{queue="{DANMAKU_QUEUE}",result="acked"}} '

    async def acked_by_second() -> float:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{suite.url(SCHEDULER)}/metrics") as got,
        ):
            metrics = await got.text()
        counts = [
            float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(acked_line)
        ]
        return counts[0] if counts else 0.0

    # The new scheduler is handed every message from event 300 on again (none of them was
    # acked), the committed batches' among them. A batch of only redelivered messages
    # may pass through a retry delay (InnoDB can pick it as a deadlock victim against its
    # neighbours), so wait until all of them are acked and the queue is empty.
    async def settled() -> bool:
        stats = await bus.queue_stats(DANMAKU_QUEUE)
        return (stats.ready, stats.retrying) == (0, 0) and await acked_by_second() >= 700

    await poll("the new scheduler to ack every message it was handed", settled)
    # More acked than were missing: the committed ones came back and were recognised.
    assert len(events) - persisted_at_kill < 700
    assert (await bus.queue_stats(DANMAKU_QUEUE)).parked == 0
    stored = await danmaku_ids(db, video_id)
    assert sorted(stored) == sorted(str(e.data["id"]) for e in events)
    async with db.connect() as conn:
        recorded = (
            await conn.execute(
                select(func.count())
                .select_from(processed_messages)
                .where(
                    processed_messages.c.consumer == DANMAKU_QUEUE,
                    processed_messages.c.message_id.in_([e.id for e in events]),
                )
            )
        ).scalar_one()
    assert recorded == len(events)


@pytest.fixture
def private_rabbitmq(tmp_path: Path) -> Iterator[RabbitMQServer]:
    """A RabbitMQ node of this test's own: the shared one on 5672 is never restarted."""
    # A start that fails half-way still stops the node it spawned (``__enter__``).
    with RabbitMQServer(tmp_path) as server:
        yield server


async def add_deleted_videos(db: Database, count: int, files: int) -> dict[str, list[str]]:
    """``count`` soft-deleted videos over ``files`` blobs, each blob also held by one live
    video; returns the deleted videos' ids by content hash."""
    now = datetime.now(UTC)
    owner_id, _ = await add_video(db)
    by_hash: dict[str, list[str]] = {secrets.token_hex(32): [] for _ in range(files)}
    hashes = list(by_hash)
    video_rows, comment_rows = [], []
    for n in range(count):
        video_id = new_id()
        content_hash = hashes[n % files]
        by_hash[content_hash].append(video_id)
        video_rows.append(
            {
                "id": video_id,
                "owner_id": owner_id,
                "upload_id": new_id(),
                "title": "t",
                "description": "",
                "content_hash": content_hash,
                "size": 1,
                "filename": "f",
                "status": "ready",
                "created_at": now,
                "updated_at": now,
                "deleted_at": now,
            }
        )
        comment_rows.append(
            {
                "id": new_id(),
                "video_id": video_id,
                "author_id": owner_id,
                "content": "c",
                "created_at": now,
            }
        )
    blob_rows = [
        # One reference per deleted video, plus the live one that must keep its file.
        {"content_hash": h, "size": 1, "ref_count": len(ids) + 1, "created_at": now}
        for h, ids in by_hash.items()
    ]
    async with db.transaction() as conn:
        await conn.execute(blobs.insert(), blob_rows)
        await conn.execute(videos.insert(), video_rows)
        await conn.execute(comments.insert(), comment_rows)
    return by_hash


async def count_done(db: Database, video_ids: list[str]) -> int:
    async with db.connect() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count())
                    .select_from(video_deletions)
                    .where(
                        video_deletions.c.video_id.in_(video_ids),
                        video_deletions.c.state == "done",
                    )
                )
            ).scalar_one()
        )


async def test_a_broker_restart_under_1000_deletions_deletes_each_video_once(
    private_rabbitmq: RabbitMQServer, suite: ServiceSuite, db: Database
) -> None:
    count, files = 1000, 20
    by_hash = await add_deleted_videos(db, count, files)
    video_ids = [v for ids in by_hash.values() for v in ids]
    namespace = suite.env["VOD_NAMESPACE"]
    # Reconnect quickly: the default 5 s would only make the test slower.
    suite.env["VOD_AMQP_URL"] = private_rabbitmq.url + "?reconnect_interval=0.2"
    await suite.start(SCHEDULER)
    bus = await open_bus(private_rabbitmq.url, namespace)
    try:
        # In the order the videos were made (so neighbours are of different files, as
        # deletions by many users would be).
        await bus.publish_many(
            Event.new(VIDEO_DELETED, {"video_id": video_id, "content_hash": content_hash})
            for video_id, content_hash in sorted((v, h) for h, ids in by_hash.items() for v in ids)
        )
        await bus.close()

        async def started() -> bool:
            return await count_done(db, video_ids) > 0

        await poll("the first deletions", started)
        # The broker goes away with deletions in flight: every connection closes, acks
        # of finished work are lost, durable queues and persistent messages stay.
        await asyncio.to_thread(private_rabbitmq.stop_app)
        done_while_down = await count_done(db, video_ids)
        await asyncio.to_thread(private_rabbitmq.start_app)
        assert done_while_down < count, "every deletion finished before the restart"

        async def all_done() -> bool:
            return await count_done(db, video_ids) == count

        await poll("every deletion after the restart", all_done)
        bus = await open_bus(private_rabbitmq.url, namespace)

        async def queue_drained() -> bool:
            stats = await bus.queue_stats(DELETIONS_QUEUE)
            return (stats.ready, stats.retrying) == (0, 0)

        await poll("the deletions queue to drain", queue_drained)
        assert (await bus.queue_stats(DELETIONS_QUEUE)).parked == 0
    finally:
        await bus.close()

    async with db.connect() as conn:
        left = (
            await conn.execute(
                select(func.count()).select_from(videos).where(videos.c.id.in_(video_ids))
            )
        ).scalar_one()
        comments_left = (
            await conn.execute(
                select(func.count()).select_from(comments).where(comments.c.video_id.in_(video_ids))
            )
        ).scalar_one()
        references = {
            row.content_hash: row.ref_count
            for row in await conn.execute(
                select(blobs.c.content_hash, blobs.c.ref_count).where(
                    blobs.c.content_hash.in_(list(by_hash))
                )
            )
        }
        records = (
            await conn.execute(
                select(video_deletions.c.steps_done).where(
                    video_deletions.c.video_id.in_(video_ids)
                )
            )
        ).scalars()
        steps = {tuple(s.split(",")) for s in records}
    assert (left, comments_left) == (0, 0)
    # Each video took exactly one reference off its file: the live video's is left.
    assert references == dict.fromkeys(by_hash, 1)
    assert steps == {STEPS}
