"""Danmaku persistence: ``danmaku.created`` events through RabbitMQ into MariaDB rows, by
the scheduler's consumer (``scheduler_service.consumers.danmaku``: multi-row inserts in
batches), end to end, in rows per second.

The real back ends of this machine, each under this run's own names: a MariaDB database
``vodbench_<hex>`` (dropped at the end), a bus namespace (its queues deleted at the end).
``python -m scheduler_service`` runs as in production. The run:

1. the scheduler starts once (it declares its durable queues) and stops;
2. ``EVENTS`` events for one video are published as the api publishes them (the bus
   adapter's ``publish_many``, publisher confirms in flight): the broker's ingest rate,
   noted beside;
3. the scheduler starts again and drains the queue; rows/s = rows written between the
   first row and the last, over that time (the database is polled every 50 ms), so the
   process's start-up is not counted. The scheduler's CPU time over the same span, per
   row, is noted beside: it moves less than rows/s with the load of a shared machine; and
   how long it waited for a CPU while runnable (schedstat), that load's share.

Reference, same run, same broker, same messages: a bare aio-pika consumer (prefetch 400,
one ack each, no database) drains a second copy of the events: what the broker and the
Python AMQP client allow before any database work. Target: >= 5,000 rows/s.

``VOD_BENCH_PROFILE=1`` also samples the draining scheduler with py-spy (see ``profile``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import pymysql
from sqlalchemy import func, select

from bench._harness import (
    RESULTS,
    Server,
    free_port,
    insert_video,
    machine,
    now_iso,
    redis_reachable,
    start,
    wait_ready,
)
from scheduler_service.consumers import danmaku as danmaku_consumer
from scheduler_service.consumers import deletions, media
from shared.bus import Event, open_bus
from shared.db import new_id, open_database
from shared.db.schema import danmaku
from shared.events import DANMAKU_CREATED

NAME: Final = "danmaku_persistence"
EVENTS: Final = int(os.environ.get("VOD_BENCH_PERSIST_EVENTS", "20000"))
MYSQL_SERVER: Final = "mysql+aiomysql://root@127.0.0.1:3306"
AMQP_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"
TARGET_ROWS_PER_S: Final = 5_000
POLL_SECONDS: Final = 0.05
DRAIN_TIMEOUT: Final = 300.0
REFERENCE_PREFETCH: Final = 400
PROFILE_SECONDS: Final = 10
QUEUES: Final = (danmaku_consumer.QUEUE, deletions.QUEUE, media.QUEUE)


def events_for(video_id: str, author_id: str) -> list[Event]:
    created_at = datetime.now(UTC).isoformat()
    return [
        Event.new(
            DANMAKU_CREATED,
            {
                "id": new_id(),
                "video_id": video_id,
                "author_id": author_id,
                "offset_ms": number,
                "content": f"bench danmaku {number}",
                "mode": "scroll",
                "color": "#ffffff",
                "created_at": created_at,
                "hidden": False,
            },
        )
        for number in range(EVENTS)
    ]


def profile(pid: int) -> subprocess.Popen[bytes] | None:
    """With ``VOD_BENCH_PROFILE=1``: py-spy samples the draining scheduler for
    ``PROFILE_SECONDS`` into ``bench/results/danmaku_persistence.pyspy.txt`` (collapsed
    stacks: one line per stack, its sample count last)."""
    if os.environ.get("VOD_BENCH_PROFILE") != "1":
        return None
    output = RESULTS / "danmaku_persistence.pyspy.txt"
    command = ["py-spy", "record", "--pid", str(pid), "--duration", str(PROFILE_SECONDS)]
    command += ["--format", "raw", "--nonblocking", "--output", str(output)]
    py_spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(py_spy), *command[1:]], stdout=subprocess.DEVNULL)


def mysql(statement: str) -> None:
    parts = urlsplit(MYSQL_SERVER)
    conn = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username)
    try:
        with conn.cursor() as cursor:
            cursor.execute(statement)
    finally:
        conn.close()


async def publish(namespace: str, events: list[Event]) -> float:
    """Publishes ``events`` with confirms; the rate (events/s)."""
    bus = await open_bus(AMQP_URL, namespace)
    try:
        started = time.perf_counter()
        await bus.publish_many(events)
        return len(events) / (time.perf_counter() - started)
    finally:
        await bus.close()


def cpu_wait_seconds(server: Server) -> float:
    """How long the process has waited, runnable, for a CPU (Linux schedstat run_delay):
    what other processes of a shared machine take from it."""
    fields = Path(f"/proc/{server.popen.pid}/schedstat").read_text().split()
    return int(fields[1]) / 1e9


async def wait_rows(
    db_url: str, video_id: str, expected: int, scheduler: Server
) -> dict[str, float]:
    """Polls the row count until ``expected``; the first and the last moment rows moved,
    and the scheduler's CPU seconds (used, and waited for) between them."""
    database = await open_database(db_url)
    count = select(func.count()).select_from(danmaku).where(danmaku.c.video_id == video_id)
    first_at: float | None = None
    first_rows = 0
    first_cpu = first_wait = 0.0
    deadline = time.monotonic() + DRAIN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            async with database.transaction() as conn:
                rows = int((await conn.execute(count)).scalar_one())
            now = time.monotonic()
            if rows and first_at is None:
                first_at, first_rows = now, rows
                first_cpu, first_wait = scheduler.cpu_seconds(), cpu_wait_seconds(scheduler)
            if rows >= expected and first_at is not None:
                return {
                    "first_at": first_at,
                    "first_rows": first_rows,
                    "done_at": now,
                    "cpu_seconds": scheduler.cpu_seconds() - first_cpu,
                    "cpu_wait_seconds": cpu_wait_seconds(scheduler) - first_wait,
                }
            await asyncio.sleep(POLL_SECONDS)  # polling a database another process writes
    finally:
        await database.close()
    raise RuntimeError(f"only some of {expected} rows arrived in {DRAIN_TIMEOUT:g} s")


async def bare_drain(namespace: str, count: int) -> float:
    """The reference: a bare aio-pika consumer acks ``count`` messages of a queue bound
    like the scheduler's; messages/s from the first delivery to the last."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=REFERENCE_PREFETCH)
        exchange = await channel.declare_exchange(
            f"{namespace}.bench-reference", aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        queue = await channel.declare_queue(f"{namespace}.bench-reference", auto_delete=True)
        await queue.bind(exchange, routing_key="#")
        body = events_for(new_id(), new_id())[0].to_json()
        for _ in range(count // 100):  # the same message size, confirmed in flights of 100
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=DANMAKU_CREATED,
                    )
                    for _ in range(100)
                )
            )
        received = 0
        first_at = 0.0
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received, first_at
            if not received:
                first_at = time.perf_counter()
            received += 1
            await message.ack()
            if received == count // 100 * 100 and not done.done():
                done.set_result(time.perf_counter())

        await queue.consume(on_message)
        finished = await asyncio.wait_for(done, DRAIN_TIMEOUT)
        return (received - 1) / (finished - first_at)
    finally:
        await connection.close()


async def clean_up(namespace: str) -> None:
    bus = await open_bus(AMQP_URL, namespace)
    try:
        await bus.delete_namespace(QUEUES)
    finally:
        await bus.close()


def run() -> dict[str, Any]:
    started_on = machine()
    database = f"vodbench_{secrets.token_hex(4)}"
    namespace = f"vodbench_{secrets.token_hex(3)}"
    db_url = f"{MYSQL_SERVER}/{database}"
    work = Path(tempfile.mkdtemp(prefix="vod-bench-persistence-"))
    mysql(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    scheduler: Server | None = None
    try:
        author_id, video_id = asyncio.run(insert_video(db_url, content_hash="0" * 64, size=1))
        port = free_port()
        env = {
            "VOD_DB_URL": db_url,
            "VOD_REDIS_URL": "redis://127.0.0.1:6379/0" if redis_reachable() else "memory://",
            "VOD_AMQP_URL": AMQP_URL,
            "VOD_BLOB_URL": f"file://{work}/blobs",
            "VOD_NAMESPACE": namespace,
            "VOD_INTERNAL_TOKEN": secrets.token_urlsafe(24),
            "VOD_HOST": "127.0.0.1",
            "VOD_SCHEDULER_PORT": str(port),
            "VOD_API_URL": "http://127.0.0.1:1",
            "VOD_STREAM_URL": "http://127.0.0.1:1",
            "VOD_SCHEDULER_URL": f"http://127.0.0.1:{port}",
            "VOD_VAR_DIR": str(work / "var"),
            "VOD_LOG_LEVEL": "WARNING",
        }
        argv = [sys.executable, "-m", "scheduler_service"]
        url = f"http://127.0.0.1:{port}"

        async def started(server: Server) -> None:
            async with aiohttp.ClientSession() as session:
                await wait_ready(server, "/readyz", session)

        scheduler = start("scheduler", argv, env, url, work)  # declares its queues
        asyncio.run(started(scheduler))
        scheduler.stop()
        publish_rate = asyncio.run(publish(namespace, events_for(video_id, author_id)))
        scheduler = start("scheduler", argv, env, url, work)
        launched = time.monotonic()
        profiler = profile(scheduler.popen.pid)
        moments = asyncio.run(wait_rows(db_url, video_id, EVENTS, scheduler))
        if profiler is not None:
            profiler.wait(PROFILE_SECONDS + 30)
        scheduler.stop()
        scheduler = None
        rows_after_first = EVENTS - moments["first_rows"]
        span = moments["done_at"] - moments["first_at"]
        rows_per_s = rows_after_first / span
        scheduler_cores = moments["cpu_seconds"] / span
        scheduler_cpu_wait = moments["cpu_wait_seconds"] / span
        cpu_us_per_row = moments["cpu_seconds"] / rows_after_first * 1e6
        reference = asyncio.run(bare_drain(namespace, EVENTS))
    finally:
        if scheduler is not None:
            scheduler.stop()
        asyncio.run(clean_up(namespace))
        mysql(f"DROP DATABASE IF EXISTS `{database}`")
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": NAME,
        "measured_at": now_iso(),
        "machine": started_on,
        "events": EVENTS,
        "publish_per_s": round(publish_rate),
        "rows_per_s": round(rows_per_s),
        "seconds_from_launch": round(moments["done_at"] - launched, 2),
        "scheduler_cpu_cores": round(scheduler_cores, 2),
        "scheduler_cpu_wait_cores": round(scheduler_cpu_wait, 2),
        "scheduler_cpu_us_per_row": round(cpu_us_per_row),
        "reference_bare_consume_per_s": round(reference),
        "x_reference": round(rows_per_s / reference, 2),
        "target_rows_per_s": TARGET_ROWS_PER_S,
        "holds": rows_per_s >= TARGET_ROWS_PER_S,
        "batch_size": danmaku_consumer.BATCH_SIZE,
        "prefetch": danmaku_consumer.PREFETCH,
    }


def summarize(result: dict[str, Any]) -> list[str]:
    verdict = "holds" if result["holds"] else "FAILS"
    return [
        f"{result['events']:,} `danmaku.created` events, RabbitMQ -> scheduler consumer "
        f"(batches of {result['batch_size']}, prefetch {result['prefetch']}) -> MariaDB.",
        "",
        f"- persisted: **{result['rows_per_s']:,} rows/s** (target >= "
        f"{result['target_rows_per_s']:,}: {verdict}); queue drained "
        f"{result['seconds_from_launch']} s after the scheduler was launched",
        f"- the scheduler meanwhile: {result.get('scheduler_cpu_cores', '?')} cores busy, "
        f"{result.get('scheduler_cpu_us_per_row', '?')} µs of CPU per row; runnable but "
        f"waiting for a CPU {result.get('scheduler_cpu_wait_cores', '?')} of the time",
        f"- reference, same broker and message size: a bare aio-pika consumer (prefetch "
        f"{REFERENCE_PREFETCH}, no database) {result['reference_bare_consume_per_s']:,} msg/s "
        f"-> persistence at {result['x_reference']}x of what the broker client allows",
        f"- publishing them (the bus adapter, confirms in flight): "
        f"{result['publish_per_s']:,} events/s",
    ]
