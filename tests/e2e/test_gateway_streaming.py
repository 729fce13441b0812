"""The gateway as its own process: gigabytes through it in flat memory, and a clean SIGTERM.

The upstream is a test-side aiohttp app; the gateway is ``python -m gateway``, configured
only by environment variables, exactly as it runs in a container.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web

from tests.conftest import JWT_PUBLIC_KEY

pytestmark = pytest.mark.e2e

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
GIB = 1024 * MIB
BLOCK = os.urandom(MIB)
TRANSFER_BYTES = GIB
# The flat-memory bound: streaming a gigabyte each way may cost the gateway this much
# above its warmed-up peak, and no more (buffering even a tenth of it would show).
RSS_ALLOWANCE = 100 * MIB
SHUTDOWN_TIMEOUT = 10.0
REPO_ROOT = Path(__file__).resolve().parents[2]
HEALTH_POLLS = 200
HEALTH_POLL_INTERVAL = 0.05
HELD_BODY = os.urandom(4 * MIB)


def expected_sha256(total: int) -> str:
    digest = hashlib.sha256()
    for _ in range(total // MIB):
        digest.update(BLOCK)
    return digest.hexdigest()


async def generated_body(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // MIB):
        yield BLOCK


@dataclass
class Upstream:
    """Stands in for every upstream service; each route does one job of the test."""

    reached_hold: asyncio.Event = field(default_factory=asyncio.Event)
    release_hold: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_put("/api/v1/uploads/{id}/chunks/{index}", self.consume)
        app.router.add_get("/api/v1/videos/{id}/stream", self.serve)
        app.router.add_get("/api/v1/videos/{id}/thumbnail", self.hold)
        return app

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def consume(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        count = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            count += len(chunk)
        return web.json_response({"bytes": count, "sha256": digest.hexdigest()})

    async def serve(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", TRANSFER_BYTES))
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = size
        await response.prepare(request)
        for _ in range(size // MIB):
            await response.write(BLOCK)
        await response.write_eof()
        return response

    async def hold(self, _request: web.Request) -> web.Response:
        self.reached_hold.set()
        await self.release_hold.wait()
        return web.Response(body=HELD_BODY, content_type="image/jpeg")


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    port: int
    log_lines: list[str]
    shutting_down: asyncio.Event

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status_kib(self, field_name: str) -> int:
        """A field of /proc/<pid>/status, in KiB (VmHWM is the peak resident set)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field_name} not in /proc/{self.process.pid}/status")

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _collect_logs(
    stream: asyncio.StreamReader, lines: list[str], shutting_down: asyncio.Event
) -> None:
    # Drained continuously: a full stderr pipe would block the gateway's logging.
    async for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        if "shutting down" in line:
            shutting_down.set()


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
async def upstream_url(aiohttp_server: Any, upstream: Upstream) -> AsyncIterator[str]:
    server = await aiohttp_server(upstream.app())
    yield str(server.make_url("")).rstrip("/")
    upstream.release_hold.set()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    ) as session:
        yield session


@pytest.fixture
async def gateway(
    upstream_url: str, tmp_path: Path, client: aiohttp.ClientSession
) -> AsyncIterator[GatewayProcess]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOD_")}
    env.update(
        {
            "VOD_HOST": "127.0.0.1",
            "VOD_GATEWAY_PORT": str(port),
            "VOD_METRICS_PORT": str(free_port()),
            "VOD_INTERNAL_TOKEN": "e2e-internal-token-" + os.urandom(8).hex(),
            "VOD_API_URL": upstream_url,
            "VOD_STREAM_URL": upstream_url,
            "VOD_SCHEDULER_URL": upstream_url,
            "VOD_DB_URL": f"sqlite+aiosqlite:///{tmp_path}/vod.db",
            "VOD_REDIS_URL": "memory://",
            "VOD_AMQP_URL": "memory://",
            "VOD_BLOB_URL": f"file://{tmp_path}/blobs",
            "VOD_VAR_DIR": str(tmp_path / "var"),
            "VOD_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
            "VOD_LOG_LEVEL": "INFO",
            "VOD_JWT_PUBLIC_KEY": JWT_PUBLIC_KEY,
        }
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        env=env,
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        limit=MIB,
    )
    assert process.stderr is not None
    gateway = GatewayProcess(process, port, [], asyncio.Event())
    log_reader = asyncio.create_task(
        _collect_logs(process.stderr, gateway.log_lines, gateway.shutting_down)
    )
    try:
        await _wait_until_healthy(gateway, client)
        yield gateway
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await log_reader


async def _wait_until_healthy(gateway: GatewayProcess, client: aiohttp.ClientSession) -> None:
    for _ in range(HEALTH_POLLS):
        if gateway.process.returncode is not None:
            pytest.fail("gateway exited at start:\n" + "\n".join(gateway.log_lines))
        try:
            async with client.get(gateway.url + "/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(HEALTH_POLL_INTERVAL)  # a poll interval, not a wait for an outcome
    pytest.fail("gateway never answered /healthz:\n" + "\n".join(gateway.log_lines))


async def upload(client: aiohttp.ClientSession, gateway: GatewayProcess, size: int) -> Any:
    async with client.put(
        gateway.url + "/api/v1/uploads/u1/chunks/0",
        data=generated_body(size),
        headers={"Content-Length": str(size)},
    ) as response:
        assert response.status == 200
        return await response.json()


async def download(
    client: aiohttp.ClientSession, gateway: GatewayProcess, size: int
) -> tuple[int, str]:
    digest = hashlib.sha256()
    count = 0
    async with client.get(gateway.url + f"/api/v1/videos/v1/stream?size={size}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        async for chunk in response.content.iter_any():
            digest.update(chunk)
            count += len(chunk)
    return count, digest.hexdigest()


async def timed(work: Callable[[], Awaitable[Any]], gateway: GatewayProcess) -> Any:
    cpu_before = gateway.cpu_seconds()
    started = time.perf_counter()
    result = await work()
    elapsed = time.perf_counter() - started
    cpu = gateway.cpu_seconds() - cpu_before
    return result, elapsed, cpu


async def test_a_gigabyte_each_way_in_flat_memory(
    gateway: GatewayProcess, client: aiohttp.ClientSession
) -> None:
    expected = await asyncio.to_thread(expected_sha256, TRANSFER_BYTES)
    startup_peak = gateway.status_kib("VmHWM")
    # Warm up every code path (imports, the upstream pool, buffers) before the baseline.
    assert (await upload(client, gateway, 8 * MIB))["bytes"] == 8 * MIB
    assert (await download(client, gateway, 8 * MIB))[0] == 8 * MIB
    baseline = gateway.status_kib("VmHWM")

    received, up_seconds, up_cpu = await timed(
        lambda: upload(client, gateway, TRANSFER_BYTES), gateway
    )
    assert received == {"bytes": TRANSFER_BYTES, "sha256": expected}
    after_upload = gateway.status_kib("VmHWM")

    (count, digest), down_seconds, down_cpu = await timed(
        lambda: download(client, gateway, TRANSFER_BYTES), gateway
    )
    assert (count, digest) == (TRANSFER_BYTES, expected)
    peak = gateway.status_kib("VmHWM")

    logger.info(
        "gateway VmHWM KiB: startup %d, warmed-up baseline %d, after 1 GiB upload %d, "
        "after 1 GiB download %d (growth %d KiB); upload %.2f s (%.0f MiB/s, gateway CPU "
        "%.2f s), download %.2f s (%.0f MiB/s, gateway CPU %.2f s)",
        startup_peak,
        baseline,
        after_upload,
        peak,
        peak - baseline,
        up_seconds,
        TRANSFER_BYTES / MIB / up_seconds,
        up_cpu,
        down_seconds,
        TRANSFER_BYTES / MIB / down_seconds,
        down_cpu,
    )
    assert peak * 1024 < baseline * 1024 + RSS_ALLOWANCE


async def test_sigterm_finishes_the_request_in_flight_then_exits_cleanly(
    gateway: GatewayProcess, client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    in_flight = asyncio.create_task(client.get(gateway.url + "/api/v1/videos/v1/thumbnail"))
    await upstream.reached_hold.wait()

    gateway.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(SHUTDOWN_TIMEOUT):  # bounds a hang; the event is the signal
        await gateway.shutting_down.wait()
    # Draining: the listener is closed while the request is still held upstream.
    assert not in_flight.done()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", gateway.port)

    upstream.release_hold.set()
    async with await in_flight as response:
        assert response.status == 200
        assert await response.read() == HELD_BODY

    async with asyncio.timeout(SHUTDOWN_TIMEOUT):
        assert await gateway.process.wait() == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", gateway.port)
