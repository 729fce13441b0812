"""vod at scale: 2 api + 2 stream + 1 scheduler + 1 gateway, as six processes, on the real
MariaDB, Redis and RabbitMQ and an S3 server (moto, or ``VOD_TEST_S3``).

One user's whole journey runs through the gateway while one replica of each scaled
service is SIGKILLed half-way, and nothing is lost: the upload started on both stream
replicas completes on the survivor, the stream is byte-identical, danmaku sent on the
api replica that died reached a viewer on the other one and are persisted exactly once,
and deleting the video removes its file from S3.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from shared.db import Database, open_database
from shared.db.schema import danmaku, video_deletions
from shared.layout import content_blob_key
from tests.conftest import JWT_PRIVATE_KEY, JWT_PUBLIC_KEY
from tests.e2e.processes import (
    ServiceProcess,
    eventually,
    free_port,
    scrape,
    start,
    start_code,
    stop_together,
    wait_healthy,
)
from tests.s3_server import S3Server, object_keys
from vod_client import BytesSource, UploadResult, VodClient

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MIB = 1024 * 1024
CHUNK = 8 * MIB  # the smallest chunk: every chunk but the last is an S3 part
# Four chunks, the last one short: enough for both stream replicas to take some before
# one of them dies, and for the survivor to take the rest.
FILM_BYTES = 3 * CHUNK + 1_234_567
PASSWORD = "scale journey password"
# Bounds on waits for work other processes do (relay, consumers, deletion): generous on
# a shared 2-core machine; the test ends as soon as each condition holds.
DEADLINE = 30.0
POLL_SECONDS = 0.1
SHUTDOWN_WAIT = 30.0
CHUNK_ROUTE = "/api/v1/uploads/{upload_id}/chunks/{index}"

# The scheduler with a blob grace of 0: the file goes with the video (the production
# default, 24 h, leaves it to the collector; see ARCHITECTURE.md), and deletions that a
# message did not finish are resumed within seconds rather than minutes.
SCHEDULER_LAUNCHER = """
import functools
from datetime import timedelta
from scheduler_service.app import SERVICE, create_app
from scheduler_service.options import SchedulerOptions
from shared.runner import run_service
options = SchedulerOptions(
    blob_grace=timedelta(0),
    relay_poll_interval=0.1,
    deletion_resume_interval=2.0,
    deletion_stale_after=timedelta(seconds=5),
)
run_service(SERVICE, functools.partial(create_app, options=options), lambda s: s.scheduler_port)
"""


@dataclass
class Cluster:
    gateway: str
    api: list[ServiceProcess]
    stream: list[ServiceProcess]
    processes: list[ServiceProcess]
    env: dict[str, str]
    s3: S3Server
    s3_prefix: str


@pytest.fixture
async def cluster(
    tmp_path: Path, real_backends_env: dict[str, str], s3_server: S3Server
) -> AsyncIterator[Cluster]:
    api_ports, stream_ports = [free_port(), free_port()], [free_port(), free_port()]
    scheduler_port, gateway_port, metrics_port = free_port(), free_port(), free_port()
    s3_prefix = f"scale-{secrets.token_hex(4)}"

    def urls(ports: list[int]) -> str:
        return ",".join(f"http://127.0.0.1:{port}" for port in ports)

    env = {
        **real_backends_env,
        "VOD_BLOB_URL": s3_server.url(s3_prefix),
        "VOD_INTERNAL_TOKEN": "scale-journey-" + os.urandom(12).hex(),
        "VOD_JWT_PRIVATE_KEY": JWT_PRIVATE_KEY,
        "VOD_JWT_PUBLIC_KEY": JWT_PUBLIC_KEY,
        "VOD_DB_MIGRATE": "1",
        "VOD_API_URL": urls(api_ports),
        "VOD_STREAM_URL": urls(stream_ports),
        "VOD_SCHEDULER_URL": urls([scheduler_port]),
        "VOD_SCHEDULER_PORT": str(scheduler_port),
        "VOD_GATEWAY_PORT": str(gateway_port),
        "VOD_METRICS_PORT": str(metrics_port),
        "VOD_ARGON2_TIME_COST": "1",
        "VOD_ARGON2_MEMORY_KIB": "1024",
        "VOD_SHUTDOWN_TIMEOUT": "5",
    }
    planned: list[tuple[ServiceProcess, int]] = []
    # All six at once: replicas racing to migrate is what the migration lock is for.
    for number, port in enumerate(api_ports):
        process = start(
            "api_service", env | {"VOD_API_PORT": str(port)}, tmp_path, name=f"api-{number}"
        )
        planned.append((process, port))
    for number, port in enumerate(stream_ports):
        process = start(
            "stream_service",
            env | {"VOD_STREAM_PORT": str(port)},
            tmp_path,
            name=f"stream-{number}",
        )
        planned.append((process, port))
    planned.append(
        (start_code(SCHEDULER_LAUNCHER, env, tmp_path, name="scheduler"), scheduler_port)
    )
    planned.append((start("gateway", env, tmp_path, name="gateway"), gateway_port))
    processes = [process for process, _ in planned]
    try:
        await asyncio.gather(
            *(
                wait_healthy(process, f"http://127.0.0.1:{port}", "/readyz")
                for process, port in planned
            )
        )
        # The gateway may have probed a replica before it listened and benched it for a
        # cool-down; the journey needs every replica in rotation from its first request.
        replica_count = len(api_ports) + len(stream_ports) + 1
        async with aiohttp.ClientSession() as session:

            async def all_in_service() -> bool:
                up = await scrape(
                    session, f"http://127.0.0.1:{metrics_port}", "vod_gateway_upstream_replica_up"
                )
                return up == replica_count

            await eventually(
                all_in_service,
                "the gateway has every replica in service",
                deadline=DEADLINE,
                poll=POLL_SECONDS,
            )
        yield Cluster(
            gateway=f"http://127.0.0.1:{gateway_port}",
            api=processes[0:2],
            stream=processes[2:4],
            processes=processes,
            env=env,
            s3=s3_server,
            s3_prefix=s3_prefix,
        )
    finally:
        codes = stop_together(processes, SHUTDOWN_WAIT)
    assert codes == dict.fromkeys(codes, 0), {
        process.name: process.log()[-2000:] for process in processes if process.name in codes
    }


async def _next_of_type(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        while True:
            body: dict[str, Any] = await ws.receive_json()
            if body["type"] == kind:
                return body


def _danmaku(offset_ms: int, content: str) -> dict[str, Any]:
    return {"offset_ms": offset_ms, "content": content, "mode": "scroll", "color": "#ff00aa"}


async def _persisted_danmaku(db: Database, video_id: str) -> list[str]:
    async with db.connect() as conn:
        rows = await conn.execute(select(danmaku.c.content).where(danmaku.c.video_id == video_id))
        return sorted(rows.scalars())


async def _deletion_state(db: Database, video_id: str) -> str | None:
    async with db.connect() as conn:
        rows = await conn.execute(
            select(video_deletions.c.state).where(video_deletions.c.video_id == video_id)
        )
        return rows.scalar()


class BlobLeftBehindError(AssertionError):
    """The scheduler finished deleting a video, and its file is still in S3."""


@dataclass
class Journey:
    cluster: Cluster
    session: aiohttp.ClientSession
    owner: VodClient
    viewer: VodClient
    film: bytes
    db: Database  # the primary, to see what the scheduler wrote

    def url(self, path: str) -> str:
        return self.cluster.gateway + path


async def test_a_journey_survives_losing_a_replica_of_each_service(cluster: Cluster) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        owner = VodClient(cluster.gateway, session=session, backoff=0.2)
        viewer = VodClient(cluster.gateway, session=session)
        for client in (owner, viewer):
            name = f"scale_{secrets.token_hex(4)}"
            await client.request(
                "POST", "/api/v1/users", json={"username": name, "password": PASSWORD}
            )
            await client.sign_in(name, PASSWORD)
        db = await open_database(cluster.env["VOD_DB_URL"])
        try:
            journey = Journey(cluster, session, owner, viewer, os.urandom(FILM_BYTES), db)
            uploaded = await _upload_while_a_stream_replica_dies(journey)
            video = await owner.create_video(upload_id=uploaded.upload_id, title="Scale")
            await _watch(journey, video["id"])
            await _danmaku_while_an_api_replica_dies(journey, video["id"])
            await viewer.request(
                "POST", f"/api/v1/videos/{video['id']}/comments", json={"content": "worth it"}
            )
            _, comments = await viewer.request("GET", f"/api/v1/videos/{video['id']}/comments")
            assert [item["content"] for item in comments["items"]] == ["worth it"]
            await _delete_down_to_the_last_byte(journey, video["id"], uploaded.content_hash)
        finally:
            await db.close()


async def _upload_while_a_stream_replica_dies(journey: Journey) -> UploadResult:
    """Chunks in parallel over both stream replicas; one is SIGKILLed once each took some."""
    cluster = journey.cluster
    replicas = [process.url for process in cluster.stream]

    async def chunks_on(url: str) -> float:
        return await scrape(
            journey.session,
            url,
            "vod_http_requests_total",
            route=CHUNK_ROUTE,
            method="PUT",
            status="204",
        )

    async def kill_once_both_took_chunks(_index: int) -> None:
        if cluster.stream[0].popen.poll() is None and all(
            [await chunks_on(url) >= 1 for url in replicas]
        ):
            cluster.stream[0].kill()

    uploaded = await journey.owner.upload(
        BytesSource(journey.film, "film.bin"),
        chunk_size=CHUNK,
        parallel=2,
        after_chunk=kill_once_both_took_chunks,
    )
    assert cluster.stream[0].popen.poll() is not None, "the upload never spread over both"
    assert uploaded.size == FILM_BYTES
    assert sorted(uploaded.sent_chunks) == [0, 1, 2, 3]
    return uploaded


async def _watch(journey: Journey, video_id: str) -> None:
    """A range across a chunk boundary, then the whole film: byte for byte the upload."""
    stream_url = journey.url(f"/api/v1/videos/{video_id}/stream")
    first, last = CHUNK - 1000, 2 * CHUNK + 1000
    headers = {"Range": f"bytes={first}-{last}"}
    async with journey.session.get(stream_url, headers=headers) as response:
        assert response.status == 206
        assert await response.read() == journey.film[first : last + 1]
    whole = hashlib.sha256()
    async with journey.session.get(stream_url) as response:
        assert response.status == 200
        async for piece in response.content.iter_chunked(MIB):
            whole.update(piece)
    assert whole.hexdigest() == hashlib.sha256(journey.film).hexdigest()


async def _danmaku_while_an_api_replica_dies(journey: Journey, video_id: str) -> None:
    """A viewer's live socket on one api replica, the sender's on the other; the sender's
    replica is SIGKILLed after the first danmaku, the sender reconnects and goes on."""
    cluster, session = journey.cluster, journey.session
    replicas = [process.url for process in cluster.api]

    async def sockets_on() -> list[float]:
        # In flight on a replica = its open live sockets + this very /metrics request.
        return [await scrape(session, url, "vod_http_requests_in_flight") - 1 for url in replicas]

    live = journey.url(f"/api/v1/videos/{video_id}/live").replace("http", "ws", 1)
    sender_live = f"{live}?access_token={journey.owner.token}"

    async def sockets_settle_at(expected: list[int], what: str) -> list[float]:
        # Polled: a gateway health check in flight at the same moment counts too.
        for _ in range(int(DEADLINE / POLL_SECONDS)):
            counts = await sockets_on()
            if sorted(counts) == expected:
                return counts
            await asyncio.sleep(POLL_SECONDS)  # polling processes we do not control
        raise AssertionError(f"not within {DEADLINE} s: {what} ({counts})")

    watching = await session.ws_connect(live)
    viewer_counts = await sockets_settle_at([0, 1], "the viewer's socket on one api replica")
    viewer_side = viewer_counts.index(1)
    sending = await session.ws_connect(sender_live)
    # Round robin: the sender's socket is on the other replica.
    await sockets_settle_at([1, 1], "one socket on each api replica")
    await sending.send_json({"type": "danmaku", **_danmaku(1000, "first")})
    sent = await _next_of_type(sending, "sent")
    seen = await _next_of_type(watching, "danmaku")
    assert (seen["id"], seen["content"]) == (sent["id"], "first")

    cluster.api[1 - viewer_side].kill()
    async with asyncio.timeout(DEADLINE):
        while not sending.closed:  # the gateway ends the socket of the dead replica
            await sending.receive()
    sending = await session.ws_connect(sender_live)
    await sending.send_json({"type": "danmaku", **_danmaku(2000, "second")})
    await _next_of_type(sending, "sent")
    assert (await _next_of_type(watching, "danmaku"))["content"] == "second"
    _, posted = await journey.viewer.request(
        "POST", f"/api/v1/videos/{video_id}/danmaku", json=_danmaku(3000, "third")
    )
    assert (await _next_of_type(watching, "danmaku"))["id"] == posted["id"]
    await sending.close()
    await watching.close()

    expected = ["first", "second", "third"]

    async def persisted_once() -> bool:
        return await _persisted_danmaku(journey.db, video_id) == expected

    await eventually(
        persisted_once, "each danmaku persisted exactly once", deadline=DEADLINE, poll=POLL_SECONDS
    )
    _, window = await journey.owner.request("GET", f"/api/v1/videos/{video_id}/danmaku")
    assert [item["content"] for item in window["items"]] == expected


async def _delete_down_to_the_last_byte(journey: Journey, video_id: str, content_hash: str) -> None:
    cluster, session = journey.cluster, journey.session
    blob_key = f"{cluster.s3_prefix}/{content_blob_key(content_hash)}"
    async with cluster.s3.admin() as s3:
        assert await object_keys(s3, cluster.s3.bucket, blob_key) == [blob_key]
    _, scheduled = await journey.owner.request("DELETE", f"/api/v1/videos/{video_id}", ok=(202,))
    assert scheduled == {"id": video_id, "deletion": "scheduled"}
    for path in (f"/api/v1/videos/{video_id}", f"/api/v1/videos/{video_id}/stream"):
        async with session.get(journey.url(path)) as response:
            assert response.status == 404

    async def deletion_done() -> bool:
        return await _deletion_state(journey.db, video_id) == "done"

    # The blob step comes before "done": from here on the file is gone or never will be.
    await eventually(
        deletion_done,
        "the scheduler finished deleting the video",
        deadline=DEADLINE,
        poll=POLL_SECONDS,
    )
    assert await _persisted_danmaku(journey.db, video_id) == []
    async with cluster.s3.admin() as s3:
        left = await object_keys(s3, cluster.s3.bucket, cluster.s3_prefix + "/")
    if left:
        raise BlobLeftBehindError(f"left in S3 after the video was deleted: {left}")
