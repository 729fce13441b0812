"""A film streamed through the gateway is never copied into memory, and a client that
stops reading stops the upstream too (issue 5, point 5).

``python -m stream_service`` and ``python -m gateway`` run as processes on the embedded
back ends (one SQLite file, each its own in-process Redis and bus), exactly as configured
in production. The test writes a 256 MiB film and its rows directly, then reads it
through the gateway over a raw socket whose receive buffer it keeps small, so "the client
stops reading" means exactly that. The upstream's own counter of bytes handed to the
kernel (``vod_stream_bytes_total``) shows how far it got.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bench._harness import insert_video
from shared.content_hash import ContentHasher
from shared.layout import content_blob_key
from tests.conftest import INTERNAL_TOKEN, JWT_PUBLIC_KEY
from tests.e2e.processes import ServiceProcess, free_port, start, wait_healthy

pytestmark = pytest.mark.e2e

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
FILM_BYTES = 256 * MIB
# What the client reads before it stops: the stream is well under way.
READ_BEFORE_STALL = 8 * MIB
# The upstream may fill every socket buffer between itself and the stalled client (the
# gateway's receive buffer on loopback autotunes up to 32 MiB here) and no more: a quarter
# of the film is far more than that, and far less than what buffering the film would take.
STALLED_UPSTREAM_LIMIT = FILM_BYTES // 4
# Growth of the gateway's resident set allowed over the warmed-up baseline; copying the
# film (or a good part of it) would be hundreds of MiB.
RSS_ALLOWANCE = 48 * MIB
CLIENT_RCVBUF = 256 * 1024
# Bounded polls of the processes' /metrics (outside the test's control).
POLLS = 200
POLL_INTERVAL = 0.05
# The counter must hold still this many polls in a row to count as stopped; a stream
# that moves sends an 8 MiB slice in milliseconds.
STILL_POLLS = 6
_METRIC_RE = re.compile(r"^(vod_stream_\w+) ([0-9.e+-]+)$", re.MULTILINE)


@dataclass
class Film:
    video_id: str
    size: int
    sha256: str


@dataclass
class Services:
    gateway: ServiceProcess
    stream: ServiceProcess

    def gateway_kib(self, field: str) -> int:
        """VmRSS (now) or VmHWM (peak) of the gateway process, in KiB."""
        status = Path(f"/proc/{self.gateway.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None, status
        return int(match[1])

    async def stream_metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(self.stream.url + "/metrics") as response:
            text = await response.text()
        return {name: float(value) for name, value in _METRIC_RE.findall(text)}


def _write_film(path: Path) -> tuple[str, str]:
    """256 MiB, one random MiB salted per MiB; its content hash and SHA-256."""
    block = bytearray(os.urandom(MIB))
    hasher, digest = ContentHasher(), hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        for index in range(FILM_BYTES // MIB):
            block[:8] = index.to_bytes(8, "big")
            hasher.update(block)
            digest.update(block)
            file.write(block)
    return hasher.hexdigest(), digest.hexdigest()


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # pytest keeps the last runs' temporary folders: do not leave a film in each.
    for film in (tmp_path / "blobs").rglob("*"):
        if film.is_file():
            film.unlink()


async def _publish(db_url: str, blob_root: Path) -> Film:
    """The rows a published video has, and its file, without the upload API."""
    staging = blob_root / "staging.bin"
    content_hash, sha256 = await asyncio.to_thread(_write_film, staging)
    target = blob_root / content_blob_key(content_hash)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    _, video_id = await insert_video(
        db_url, content_hash=content_hash, size=FILM_BYTES, filename="film.bin"
    )
    return Film(video_id, FILM_BYTES, sha256)


@pytest.fixture
async def published(scratch: Path) -> AsyncIterator[tuple[Services, Film]]:
    db_url = f"sqlite+aiosqlite:///{scratch}/vod.db"
    film = await _publish(db_url, scratch / "blobs")
    stream_port, gateway_port = free_port(), free_port()
    env = {
        "VOD_DB_URL": db_url,
        "VOD_REDIS_URL": "memory://",
        "VOD_AMQP_URL": "memory://",
        "VOD_BLOB_URL": f"file://{scratch}/blobs",
        "VOD_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "VOD_JWT_PUBLIC_KEY": JWT_PUBLIC_KEY,
        "VOD_HOST": "127.0.0.1",
        "VOD_STREAM_PORT": str(stream_port),
        "VOD_GATEWAY_PORT": str(gateway_port),
        "VOD_METRICS_PORT": str(free_port()),
        "VOD_API_URL": "http://127.0.0.1:1",
        "VOD_STREAM_URL": f"http://127.0.0.1:{stream_port}",
        "VOD_SCHEDULER_URL": "http://127.0.0.1:1",
        "VOD_VAR_DIR": str(scratch / "var"),
        "VOD_SHUTDOWN_TIMEOUT": "5",
        "VOD_LOG_LEVEL": "WARNING",
    }
    stream = start("stream_service", env, scratch)
    gateway = start("gateway", env, scratch)
    try:
        await wait_healthy(stream, f"http://127.0.0.1:{stream_port}")
        await wait_healthy(gateway, f"http://127.0.0.1:{gateway_port}")
        yield Services(gateway, stream), film
    finally:
        codes = {p.name: p.terminate() for p in (gateway, stream)}
    assert codes == {"gateway": 0, "stream_service": 0}, gateway.log() + stream.log()


class RawClient:
    """One HTTP/1.1 GET over a plain socket whose reading the test controls byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def get(cls, url: str, path: str) -> tuple[RawClient, int, dict[str, str]]:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A fixed small buffer (no autotuning): when the test stops reading, the
        # client's side holds little, and the pressure reaches the gateway at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        # limit: asyncio's reader stops taking from the socket beyond twice this.
        reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return cls(reader, writer), status, headers

    async def read(self, count: int, digest: hashlib._Hash | None = None) -> int:
        """Reads ``count`` bytes of body (or up to its end); how many it read."""
        done = 0
        while done < count:
            piece = await self.reader.read(min(MIB, count - done))
            if not piece:
                break
            if digest is not None:
                digest.update(piece)
            done += len(piece)
        return done

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def _until_still(
    services: Services, session: aiohttp.ClientSession, name: str
) -> dict[str, float]:
    """Polls the upstream's metrics until ``name`` holds still for ``STILL_POLLS`` polls."""
    previous, still = None, 0
    for _ in range(POLLS):
        metrics = await services.stream_metrics(session)
        still = still + 1 if metrics[name] == previous else 0
        if still >= STILL_POLLS:
            return metrics
        previous = metrics[name]
        await asyncio.sleep(POLL_INTERVAL)  # a poll of another process, not a timing guess
    raise AssertionError(f"{name} never stopped moving: {previous}")


async def _until(
    services: Services, session: aiohttp.ClientSession, name: str, value: float
) -> None:
    for _ in range(POLLS):
        if (await services.stream_metrics(session))[name] == value:
            return
        await asyncio.sleep(POLL_INTERVAL)  # a poll of another process, not a timing guess
    raise AssertionError(f"{name} never reached {value}")


async def test_a_stalled_client_stalls_the_upstream_and_memory_stays_flat(
    published: tuple[Services, Film],
) -> None:
    services, film = published
    path = f"/api/v1/videos/{film.video_id}/stream"
    async with aiohttp.ClientSession() as session:
        # Warm up the gateway's paths (imports, upstream pool, buffers) before the baseline.
        warm, status, _ = await RawClient.get(services.gateway.url, path)
        assert status == 200
        await warm.close()
        await _until(services, session, "vod_stream_active", 0)
        baseline_rss = services.gateway_kib("VmRSS")
        baseline_peak = services.gateway_kib("VmHWM")
        sent_before = (await services.stream_metrics(session))["vod_stream_bytes_total"]

        client, status, headers = await RawClient.get(services.gateway.url, path)
        assert status == 200
        assert int(headers["content-length"]) == film.size
        digest = hashlib.sha256()
        assert await client.read(READ_BEFORE_STALL, digest) == READ_BEFORE_STALL

        # The client stops reading: the upstream must stop soon after.
        stalled = await _until_still(services, session, "vod_stream_bytes_total")
        sent_while_stalled = stalled["vod_stream_bytes_total"] - sent_before
        assert stalled["vod_stream_active"] == 1
        assert READ_BEFORE_STALL <= sent_while_stalled < STALLED_UPSTREAM_LIMIT
        stalled_rss = services.gateway_kib("VmRSS")
        assert (stalled_rss - baseline_rss) * 1024 < RSS_ALLOWANCE

        # Reading again resumes the same stream to its last byte.
        rest = film.size - READ_BEFORE_STALL
        assert await client.read(rest, digest) == rest
        assert digest.hexdigest() == film.sha256
        await client.close()
        await _until(services, session, "vod_stream_active", 0)
        sent_in_total = (await services.stream_metrics(session))["vod_stream_bytes_total"]
        assert sent_in_total - sent_before == film.size
    peak = services.gateway_kib("VmHWM")
    logger.info(
        "stalled after %d MiB read: upstream had sent %.1f MiB; gateway RSS KiB baseline %d, "
        "stalled %d, peak %d → %d after the whole %d MiB",
        READ_BEFORE_STALL // MIB,
        sent_while_stalled / MIB,
        baseline_rss,
        stalled_rss,
        baseline_peak,
        peak,
        film.size // MIB,
    )
    assert (peak - baseline_peak) * 1024 < RSS_ALLOWANCE


async def test_a_client_that_leaves_frees_the_upstream_at_once(
    published: tuple[Services, Film],
) -> None:
    services, film = published
    path = f"/api/v1/videos/{film.video_id}/stream"
    async with aiohttp.ClientSession() as session:
        client, status, _ = await RawClient.get(services.gateway.url, path)
        assert status == 200
        assert await client.read(MIB) == MIB
        await _until_still(services, session, "vod_stream_bytes_total")
        await client.close()
        # The gateway drops its upstream connection; the stream service's slot frees.
        await _until(services, session, "vod_stream_active", 0)
        metrics = await services.stream_metrics(session)
    assert metrics["vod_stream_bytes_total"] < STALLED_UPSTREAM_LIMIT
