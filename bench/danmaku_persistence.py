"""Danmaku persistence: ``danmaku.created`` events through RabbitMQ into MariaDB rows, by
the scheduler's consumer (``scheduler_service.consumers.danmaku``: multi-row inserts in
batches), end to end, in rows per second, with one scheduler process and with two.

The real back ends of this machine, each under this run's own names: a MariaDB database
``vodbench_<hex>`` (dropped at the end), a bus namespace (its queues deleted at the end).
``python -m scheduler_service`` runs as in production. The run:

1. the scheduler starts once (it declares its durable queues) and stops;
2. one drain per process count of ``SCHEDULER_COUNTS`` (1, then 2), each over a video of
   its own:

   a. ``EVENTS`` events for that video are published as the api publishes them (the bus
      adapter's ``publish_many``, publisher confirms in flight): the broker's ingest rate,
      noted beside;
   b. that many scheduler processes start together and share the queue (how a site scales
      the consumer: replicas dedupe on event id, the outbox relay and the timers take a
      Redis lease); rows/s = that video's rows written between the first row and the
      last, over that time (the database is polled every 50 ms), so start-up is not
      counted. The processes' CPU time over the same span, summed, per row, is noted
      beside: it moves less than rows/s with the load of a shared machine; and how long
      they waited for a CPU while runnable (schedstat), that load's share.

Why two drains: on this 2-core machine one scheduler process is CPU-bound (about one core
busy), most of it the AMQP client's per-message work (aiormq, aio-pika, pamqp), not the
database; a second process consuming the same queue uses the second core. The best drain
gives the top-level figures and ``holds``; ``holds_with_processes`` is the fewest
processes that reach the target.

Reference, same run, same broker, same messages: a bare aio-pika consumer (prefetch 400,
one ack each, no database) drains a further copy of the events: what the broker and the
Python AMQP client allow in one process before any database work. Target: >= 5,000
rows/s.

``VOD_BENCH_PROFILE=1`` also samples the 1-process drain's scheduler with py-spy (see
``profile``). ``VOD_BENCH_PERSIST_SCHEDULERS="1,2"`` sets the process counts.
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
from dataclasses import dataclass, field
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
    add_video,
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


def scheduler_counts(spec: str | None) -> tuple[int, ...]:
    """The scheduler process counts to drain with: ``spec`` ("1,2") or ``(1, 2)``."""
    if not spec:
        return (1, 2)
    counts = tuple(int(part) for part in spec.split(",") if part.strip())
    if not counts or min(counts) < 1:
        raise ValueError(f"VOD_BENCH_PERSIST_SCHEDULERS wants counts >= 1, not {spec!r}")
    return counts


SCHEDULER_COUNTS: Final = scheduler_counts(os.environ.get("VOD_BENCH_PERSIST_SCHEDULERS"))


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


def cpu_wait_seconds(servers: list[Server]) -> float:
    """How long the processes have waited, runnable, for a CPU (Linux schedstat
    run_delay), summed: what other processes of a shared machine take from them."""
    total = 0.0
    for server in servers:
        fields = Path(f"/proc/{server.popen.pid}/schedstat").read_text().split()
        total += int(fields[1]) / 1e9
    return total


def cpu_seconds(servers: list[Server]) -> float:
    return sum(server.cpu_seconds() for server in servers)


async def wait_rows(
    db_url: str, video_id: str, expected: int, schedulers: list[Server]
) -> dict[str, float]:
    """Polls the row count until ``expected``; the first and the last moment rows moved,
    and the schedulers' CPU seconds (used, and waited for), summed, between them."""
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
                first_cpu, first_wait = cpu_seconds(schedulers), cpu_wait_seconds(schedulers)
            if rows >= expected and first_at is not None:
                return {
                    "first_at": first_at,
                    "first_rows": first_rows,
                    "done_at": now,
                    "cpu_seconds": cpu_seconds(schedulers) - first_cpu,
                    "cpu_wait_seconds": cpu_wait_seconds(schedulers) - first_wait,
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


@dataclass
class Schedulers:
    """Starts ``python -m scheduler_service`` processes, each on a port of its own, and
    keeps those not yet stopped in ``running`` (for the caller's ``finally``)."""

    env: dict[str, str]
    work: Path
    running: list[Server] = field(default_factory=list)

    def launch(self, name: str) -> Server:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**self.env, "VOD_SCHEDULER_PORT": str(port), "VOD_SCHEDULER_URL": url}
        server = start(name, [sys.executable, "-m", "scheduler_service"], env, url, self.work)
        self.running.append(server)
        return server

    def stop(self, servers: list[Server]) -> None:
        for server in servers:
            server.stop()
            self.running.remove(server)

    def stop_all(self) -> None:
        self.stop(list(self.running))


async def ready(servers: list[Server]) -> None:
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(wait_ready(server, "/readyz", session) for server in servers))


def drain(
    schedulers: Schedulers,
    processes: int,
    *,
    db_url: str,
    namespace: str,
    video_id: str,
    author_id: str,
    profiled: bool,
) -> dict[str, Any]:
    """Publishes ``EVENTS`` events for ``video_id``, starts ``processes`` schedulers
    sharing the queue, waits for the video's rows, stops them: the drain's figures.
    ``profiled``: py-spy samples the first process (with ``VOD_BENCH_PROFILE=1``)."""
    publish_rate = asyncio.run(publish(namespace, events_for(video_id, author_id)))
    servers = [schedulers.launch(f"scheduler-{processes}p-{n}") for n in range(processes)]
    launched = time.monotonic()
    profiler = profile(servers[0].popen.pid) if profiled else None
    moments = asyncio.run(wait_rows(db_url, video_id, EVENTS, servers))
    if profiler is not None:
        profiler.wait(PROFILE_SECONDS + 30)
    schedulers.stop(servers)
    rows_after_first = EVENTS - moments["first_rows"]
    span = moments["done_at"] - moments["first_at"]
    rows_per_s = rows_after_first / span
    return {
        "processes": processes,
        "rows_per_s": round(rows_per_s),
        "holds": rows_per_s >= TARGET_ROWS_PER_S,
        "seconds_from_launch": round(moments["done_at"] - launched, 2),
        "scheduler_cpu_cores": round(moments["cpu_seconds"] / span, 2),
        "scheduler_cpu_wait_cores": round(moments["cpu_wait_seconds"] / span, 2),
        "scheduler_cpu_us_per_row": round(moments["cpu_seconds"] / rows_after_first * 1e6),
        "publish_per_s": round(publish_rate),
    }


def run() -> dict[str, Any]:
    started_on = machine()
    database = f"vodbench_{secrets.token_hex(4)}"
    namespace = f"vodbench_{secrets.token_hex(3)}"
    db_url = f"{MYSQL_SERVER}/{database}"
    work = Path(tempfile.mkdtemp(prefix="vod-bench-persistence-"))
    content_hash = "0" * 64
    mysql(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    schedulers = Schedulers(
        {
            "VOD_DB_URL": db_url,
            "VOD_REDIS_URL": "redis://127.0.0.1:6379/0" if redis_reachable() else "memory://",
            "VOD_AMQP_URL": AMQP_URL,
            "VOD_BLOB_URL": f"file://{work}/blobs",
            "VOD_NAMESPACE": namespace,
            "VOD_INTERNAL_TOKEN": secrets.token_urlsafe(24),
            "VOD_HOST": "127.0.0.1",
            "VOD_API_URL": "http://127.0.0.1:1",
            "VOD_STREAM_URL": "http://127.0.0.1:1",
            "VOD_VAR_DIR": str(work / "var"),
            "VOD_LOG_LEVEL": "WARNING",
        },
        work,
    )
    drains: list[dict[str, Any]] = []
    try:
        author_id, video_id = asyncio.run(insert_video(db_url, content_hash=content_hash, size=1))
        declaring = schedulers.launch("scheduler")  # declares its queues
        asyncio.run(ready([declaring]))
        schedulers.stop([declaring])
        for index, processes in enumerate(SCHEDULER_COUNTS):
            if index:  # each drain counts the rows of a video of its own
                video_id = asyncio.run(
                    add_video(db_url, author_id, content_hash=content_hash, size=1)
                )
            profiled = processes == 1 and all(d["processes"] != 1 for d in drains)
            drains.append(
                drain(
                    schedulers,
                    processes,
                    db_url=db_url,
                    namespace=namespace,
                    video_id=video_id,
                    author_id=author_id,
                    profiled=profiled,
                )
            )
        reference = asyncio.run(bare_drain(namespace, EVENTS))
    finally:
        schedulers.stop_all()
        try:
            asyncio.run(clean_up(namespace))
        finally:
            mysql(f"DROP DATABASE IF EXISTS `{database}`")
            shutil.rmtree(work, ignore_errors=True)
    best = max(drains, key=lambda d: d["rows_per_s"])
    holding = [d["processes"] for d in drains if d["holds"]]
    return {
        "benchmark": NAME,
        "measured_at": now_iso(),
        "machine": started_on,
        "events": EVENTS,
        # the best drain's figures, under the keys of the single-drain results
        "processes": best["processes"],
        "publish_per_s": best["publish_per_s"],
        "rows_per_s": best["rows_per_s"],
        "seconds_from_launch": best["seconds_from_launch"],
        "scheduler_cpu_cores": best["scheduler_cpu_cores"],
        "scheduler_cpu_wait_cores": best["scheduler_cpu_wait_cores"],
        "scheduler_cpu_us_per_row": best["scheduler_cpu_us_per_row"],
        "reference_bare_consume_per_s": round(reference),
        "x_reference": round(best["rows_per_s"] / reference, 2),
        "target_rows_per_s": TARGET_ROWS_PER_S,
        "holds": best["holds"],
        "holds_with_processes": min(holding) if holding else None,
        "drains": drains,
        "batch_size": danmaku_consumer.BATCH_SIZE,
        "prefetch": danmaku_consumer.PREFETCH,
    }


def summarize(result: dict[str, Any]) -> list[str]:
    target = result["target_rows_per_s"]
    drains = result.get("drains") or [{**result, "processes": result.get("processes", 1)}]
    lines = [
        f"{result['events']:,} `danmaku.created` events, RabbitMQ -> scheduler consumer "
        f"(batches of {result['batch_size']}, prefetch {result['prefetch']}) -> MariaDB; "
        "one drain per scheduler process count, the processes sharing the queue.",
        "",
    ]
    for each in drains:
        processes = each["processes"]
        verdict = "holds" if each["rows_per_s"] >= target else "FAILS"
        lines.append(
            f"- {processes} scheduler process{'' if processes == 1 else 'es'}: "
            f"**{each['rows_per_s']:,} rows/s** (target >= {target:,}: {verdict}); "
            f"{each.get('scheduler_cpu_cores', '?')} cores busy, "
            f"{each.get('scheduler_cpu_us_per_row', '?')} µs of CPU per row; runnable but "
            f"waiting for a CPU {each.get('scheduler_cpu_wait_cores', '?')} of the time; "
            f"queue drained {each['seconds_from_launch']} s after launch"
        )
    publish_rates = [d.get("publish_per_s", result["publish_per_s"]) for d in drains]
    return [
        *lines,
        f"- reference, same broker and message size: a bare aio-pika consumer (one process, "
        f"prefetch {REFERENCE_PREFETCH}, no database) "
        f"{result['reference_bare_consume_per_s']:,} msg/s -> the best drain at "
        f"{result['x_reference']}x of what one process's broker client allows",
        "- publishing them (the bus adapter, confirms in flight): "
        + ", then ".join(f"{rate:,}" for rate in publish_rates)
        + " events/s",
    ]
