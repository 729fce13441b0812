"""Graceful shutdown (SIGTERM) of each service, as processes on the real back ends.

One cluster for the module: one api, two stream replicas and a gateway (no scheduler:
nothing here needs it), and one video. Each test stops one service, in the order a
cluster can lose them and still serve the next test:

- a stream replica, in the middle of a download that a stalled client holds: it reports
  503 ``draining`` on ``/readyz`` while it still serves, then refuses new connections
  (the gateway sends new requests to the other replica), cuts the download at the end
  of its grace and exits 0; the client resumes with ``Range`` through the gateway, lands
  on the other replica, and the bytes joined are the uploaded ones;
- api_service, while a sign-up's body is still on its way: the request is finished after
  the door closed, and the process exits 0;
- the gateway, in the middle of a download: the client reads the rest after the door
  closed, gets every byte, and the gateway exits 0.

No sleeps for timing: each step waits for a state the test can observe (``/readyz``,
``/metrics``, a refused connection, the process's exit).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
import pytest_asyncio

from tests.e2e.processes import (
    ServiceProcess,
    eventually,
    free_port,
    scrape,
    services_env,
    start,
    stop_together,
    wait_healthy,
)
from vod_client import BytesSource, VodClient

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

MIB = 1024 * 1024
# About twice what the socket buffers between a stream replica and a client that stopped
# reading hold (≈ 15 MiB measured on loopback): the replica is still sending when it is
# told to stop. Were it ever all buffered, serving_replica() would fail, not pass.
FILM_BYTES = 32 * MIB + 4321
READ_PIECE = 64 * 1024  # the client's small reads
PASSWORD = "graceful shutdown password"
STREAM_ROUTE = "/api/v1/videos/{video_id}/stream"

# Every process drains this long after SIGTERM (/readyz 503, still serving), as behind a
# balancer that needs a probe period to take it out.
DRAIN_SECONDS = 1.0
# A stream replica's grace for requests in flight: the stalled download outlives it.
STREAM_SHUTDOWN_TIMEOUT = 1.5
# api_service's and the gateway's: far longer than their in-flight request needs, so
# a cut would be a bug, not a slow machine.
SHUTDOWN_TIMEOUT = 20.0
# Closing pools and connections after the grace; a process that takes longer than
# drain + grace + this is treated as hung (Kubernetes would SIGKILL it).
CLEANUP_SECONDS = 10.0
# Bounds on waits for other processes; each wait ends as soon as its condition holds.
DEADLINE = 30.0
POLL_SECONDS = 0.05


@dataclass
class Cluster:
    gateway: ServiceProcess
    api: ServiceProcess
    stream: list[ServiceProcess]
    film: bytes
    stream_url: str  # the film's, through the gateway
    gateway_operators: str  # the gateway's operators' listener: /metrics, detailed /readyz


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    mysql_database_url: str,
    redis_server_url: str,
    amqp_server_url: str,
    namespace: str,
) -> AsyncIterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("graceful")
    stream_ports = [free_port(), free_port()]
    backends = {  # as tests.conftest.real_backends_env, for a module-wide cluster
        "VOD_DB_URL": mysql_database_url,
        "VOD_REDIS_URL": redis_server_url,
        "VOD_AMQP_URL": amqp_server_url,
        "VOD_NAMESPACE": f"{namespace}_{secrets.token_hex(3)}",
    }
    env = services_env(
        backends,
        log_dir / "blobs",
        VOD_STREAM_URL=",".join(f"http://127.0.0.1:{port}" for port in stream_ports),
        VOD_SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS),
        VOD_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
    )
    api = start("api_service", env, log_dir, name="api")
    stream = [
        start(
            "stream_service",
            env
            | {"VOD_STREAM_PORT": str(port), "VOD_SHUTDOWN_TIMEOUT": str(STREAM_SHUTDOWN_TIMEOUT)},
            log_dir,
            name=f"stream-{number}",
        )
        for number, port in enumerate(stream_ports)
    ]
    processes = [api, *stream]
    try:
        await asyncio.gather(
            wait_healthy(api, env["VOD_API_URL"], "/readyz"),
            *(
                wait_healthy(process, f"http://127.0.0.1:{port}", "/readyz")
                for process, port in zip(stream, stream_ports, strict=True)
            ),
        )
        # Once its upstreams answer, so its first health round finds them all in service.
        # Its own /readyz also wants a scheduler, which this test does not run.
        gateway = start("gateway", env, log_dir, name="gateway")
        processes.append(gateway)
        await wait_healthy(gateway, f"http://127.0.0.1:{env['VOD_GATEWAY_PORT']}")
        operators = f"http://127.0.0.1:{env['VOD_METRICS_PORT']}"
        film = os.urandom(FILM_BYTES)
        async with aiohttp.ClientSession() as session:

            async def all_in_service() -> bool:
                api_up = await scrape(
                    session, operators, "vod_gateway_upstream_replica_up", service="api"
                )
                stream_up = await scrape(
                    session, operators, "vod_gateway_upstream_replica_up", service="stream"
                )
                return (api_up, stream_up) == (1, len(stream))

            await eventually(
                all_in_service,
                "the gateway has every replica in service",
                deadline=DEADLINE,
                poll=POLL_SECONDS,
            )
            stream_url = await publish(session, gateway.url, film)
        yield Cluster(
            gateway=gateway,
            api=api,
            stream=stream,
            film=film,
            stream_url=stream_url,
            gateway_operators=operators,
        )
    finally:
        codes = stop_together(processes, DRAIN_SECONDS + SHUTDOWN_TIMEOUT + CLEANUP_SECONDS)
    assert codes == dict.fromkeys(codes, 0), {
        process.name: process.log()[-2000:] for process in processes if process.name in codes
    }


async def readyz(url: str) -> tuple[int, object, str]:
    """``/readyz`` of one process on a fresh connection: its status, JSON body and
    ``Connection`` header."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(url + "/readyz") as response,
    ):
        return response.status, await response.json(), response.headers.get("Connection", "")


async def refuses_connections(process: ServiceProcess) -> bool:
    """Whether the process's port refuses a new connection (its listener is closed)."""
    host, port = process.url.removeprefix("http://").split(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def draining_then_closed(process: ServiceProcess, operators: str | None = None) -> None:
    """After SIGTERM: 503 ``draining`` on ``/readyz`` while it still answers, then its
    door closes while it is still running (a request in flight holds it). ``operators``:
    where its detailed ``/readyz`` is, if not on its own port (the gateway's)."""
    seen: tuple[int, object, str] = (0, None, "")

    async def draining() -> bool:
        nonlocal seen
        seen = await readyz(operators or process.url)
        return seen[1] == {"status": "draining"}

    # SIGTERM is handled by the event loop: a request racing it may still see "ready".
    await eventually(
        draining, f"{process.name} reports draining", deadline=DEADLINE, poll=POLL_SECONDS
    )
    # Every response while draining closes its connection: keep-alive clients (the
    # gateway's pool) reconnect, and land elsewhere once the door is closed.
    assert (seen[0], seen[2]) == (503, "close")

    async def closed() -> bool:
        return process.popen.poll() is not None or await refuses_connections(process)

    await eventually(
        closed, f"{process.name} closes its listener", deadline=DEADLINE, poll=POLL_SECONDS
    )
    assert process.popen.poll() is None, f"{process.name} exited with a request in flight"


def sigterm(process: ServiceProcess) -> float:
    """Sends SIGTERM; when (``time.monotonic``), for ``exits_cleanly``."""
    process.popen.send_signal(signal.SIGTERM)
    return time.monotonic()


async def exits_cleanly(process: ServiceProcess, signalled: float, shutdown_timeout: float) -> None:
    """The process exits 0 within its grace: drain + in-flight timeout + cleanup, from
    the SIGTERM sent at ``signalled``."""
    grace = DRAIN_SECONDS + shutdown_timeout + CLEANUP_SECONDS
    left = max(0.0, signalled + grace - time.monotonic())
    try:
        code = await asyncio.to_thread(process.popen.wait, left)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{process.name} still running {grace} s after SIGTERM:\n{process.log()[-3000:]}"
        ) from None
    assert code == 0, process.log()[-3000:]


async def signed_in(session: aiohttp.ClientSession, gateway: str) -> VodClient:
    client = VodClient(gateway, session=session)
    name = f"grace_{secrets.token_hex(4)}"
    await client.request("POST", "/api/v1/users", json={"username": name, "password": PASSWORD})
    await client.sign_in(name, PASSWORD)
    return client


async def publish(session: aiohttp.ClientSession, gateway: str, film: bytes) -> str:
    """Uploads ``film`` through the gateway as a new video; the video's stream URL."""
    client = await signed_in(session, gateway)
    video = await client.publish(BytesSource(film, "film.bin"), title="Graceful")
    return f"{gateway}/api/v1/videos/{video['id']}/stream"


async def serving_replica(
    session: aiohttp.ClientSession, replicas: list[ServiceProcess]
) -> ServiceProcess:
    """The stream replica sending the one download in progress."""
    serving: list[ServiceProcess] = []

    async def one_is_sending() -> bool:
        serving[:] = [
            replica
            for replica in replicas
            if replica.popen.poll() is None
            and await scrape(session, replica.url, "vod_stream_active") == 1
        ]
        return len(serving) == 1

    await eventually(
        one_is_sending,
        "one stream replica sends the download",
        deadline=DEADLINE,
        poll=POLL_SECONDS,
    )
    return serving[0]


async def read_until_cut(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The rest of ``response``'s body as far as it came, and whether it was cut short."""
    pieces: list[bytes] = []
    try:
        async for piece in response.content.iter_chunked(READ_PIECE):
            pieces.append(piece)
    except aiohttp.ClientPayloadError:
        return b"".join(pieces), True
    return b"".join(pieces), False


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_download_cut_by_a_stream_replica_shutdown_resumes_on_the_other(
    cluster: Cluster,
) -> None:
    film, stream_url = cluster.film, cluster.stream_url
    async with aiohttp.ClientSession() as session:
        async with session.get(stream_url) as download:
            assert download.status == 200
            etag = download.headers["ETag"]
            # One small read, then the client stops reading: the replica's writes stall.
            first = await download.content.readexactly(READ_PIECE)
            serving = await serving_replica(session, cluster.stream)
            (other,) = [replica for replica in cluster.stream if replica is not serving]

            async def ranges_served_by_the_other() -> float:
                return await scrape(
                    session, other.url, "vod_http_requests_total", route=STREAM_ROUTE, status="206"
                )

            before = await ranges_served_by_the_other()
            signalled = sigterm(serving)
            await draining_then_closed(serving)
            # New requests still find the video, on the other replica: the door is closed,
            # and so are the gateway's idle pooled connections to the stopping one.
            async with session.get(stream_url, headers={"Range": "bytes=0-1023"}) as probe:
                assert probe.status == 206
                assert await probe.read() == film[:1024]
            assert await ranges_served_by_the_other() == before + 1
            # The stalled download outlives the replica's grace: it is cut, and the
            # replica exits all the same.
            await exits_cleanly(serving, signalled, STREAM_SHUTDOWN_TIMEOUT)
            rest, cut = await read_until_cut(download)

        received = first + rest
        assert cut, "the stalled download finished on a replica that was shut down"
        assert len(received) < len(film)
        resume = {"Range": f"bytes={len(received)}-", "If-Range": etag}
        async with session.get(stream_url, headers=resume) as resumed:
            assert resumed.status == 206
            assert resumed.headers["Content-Range"] == (
                f"bytes {len(received)}-{len(film) - 1}/{len(film)}"
            )
            received += await resumed.read()
        assert await ranges_served_by_the_other() == before + 2
    assert sha256(received) == sha256(film)


async def test_api_service_finishes_a_request_in_flight_after_sigterm(
    cluster: Cluster,
) -> None:
    credentials = {"username": f"grace_{secrets.token_hex(4)}", "password": PASSWORD}
    body = orjson.dumps(credentials)
    rest_of_body = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[:10]
        await rest_of_body.wait()
        yield body[10:]

    async with aiohttp.ClientSession() as session:
        sign_up = asyncio.create_task(
            session.post(
                cluster.gateway.url + "/api/v1/users",
                data=slow_body(),
                headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
            )
        )

        async def reached_the_api() -> bool:
            # In flight: the sign-up and this /metrics request.
            in_flight = await scrape(session, cluster.api.url, "vod_http_requests_in_flight")
            return in_flight >= 2

        await eventually(
            reached_the_api, "the sign-up reaches api_service", deadline=DEADLINE, poll=POLL_SECONDS
        )
        signalled = sigterm(cluster.api)
        await draining_then_closed(cluster.api)
        assert not sign_up.done()

        # The rest of the body reaches a process whose door is closed, and is read.
        rest_of_body.set()
        async with await sign_up as response:
            assert response.status == 201, await response.text()
            assert (await response.json())["username"] == credentials["username"]
    await exits_cleanly(cluster.api, signalled, SHUTDOWN_TIMEOUT)


async def test_the_gateway_finishes_a_download_in_flight_after_sigterm(
    cluster: Cluster,
) -> None:
    async with aiohttp.ClientSession() as session, session.get(cluster.stream_url) as download:
        assert download.status == 200
        first = await download.content.readexactly(READ_PIECE)
        # Still sending, so the gateway is still relaying: the client is the slow one.
        await serving_replica(session, cluster.stream)

        signalled = sigterm(cluster.gateway)
        await draining_then_closed(cluster.gateway, cluster.gateway_operators)
        rest, cut = await read_until_cut(download)
    assert not cut, "the gateway cut a download it had the grace to finish"
    assert sha256(first + rest) == sha256(cluster.film)
    await exits_cleanly(cluster.gateway, signalled, SHUTDOWN_TIMEOUT)
