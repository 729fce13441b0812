"""The uploader as people run it: ``python -m vod_client upload`` in its own process against
``python -m standalone``, killed with SIGKILL mid-upload, then run again.

Between the two sits a small proxy in the test that passes everything on but holds every
chunk PUT after the first: the killed run has then stored exactly one chunk, with no
timing involved. The second run goes through the same proxy (the remembered upload is
keyed by the gateway's URL), now passing everything, and must send only the other chunks.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.content_hash import content_hash
from tests.e2e.processes import ROOT, ServiceProcess, free_port, start, wait_healthy

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
CHUNK = 8 * MIB
PASSWORD = "correct horse battery"
CHUNK_PUT = re.compile(r"^/api/v1/uploads/[^/]+/chunks/(\d+)$")


class GatingProxy:
    """Forwards to the gateway; while ``holding``, lets the first chunk PUT to arrive through
    and holds every later one."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.holding = True
        self.chunks_passed: list[int] = []
        self.admitted = 0
        self.first_chunk_stored = asyncio.Event()
        self._release = asyncio.Event()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        match = CHUNK_PUT.match(request.path)
        if match and self.holding:
            if self.admitted:
                # Until the test ends (the client is killed first); then nothing goes on.
                await self._release.wait()
                return web.Response(status=503)
            self.admitted += 1
        body = await request.read()
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in ("authorization", "content-type", "x-chunk-sha256")
        }
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                self.target + request.path_qs,
                data=io.BytesIO(body),
                headers=headers,
            ) as answer,
        ):
            payload = await answer.read()
            response = web.Response(
                status=answer.status,
                body=payload if answer.status != 204 else None,
                content_type=answer.content_type if payload else None,
            )
        if match and answer.status == 204:
            self.chunks_passed.append(int(match[1]))
            self.first_chunk_stored.set()
        return response

    def close(self) -> None:
        self._release.set()


@pytest.fixture
async def standalone(tmp_path: Path) -> AsyncIterator[str]:
    ports = {name: free_port() for name in ("gateway", "api", "stream", "scheduler")}
    env = {
        "PYTHONPATH": str(ROOT),
        "VOD_VAR_DIR": str(tmp_path / "var"),
        "VOD_DB_URL": f"sqlite+aiosqlite:///{tmp_path}/vod.db",
        "VOD_BLOB_URL": f"file://{tmp_path}/blobs",
        "VOD_LOG_LEVEL": "WARNING",
        **{f"VOD_{name.upper()}_PORT": str(port) for name, port in ports.items()},
        **{
            f"VOD_{name.upper()}_URL": f"http://127.0.0.1:{ports[name]}"
            for name in ("api", "stream", "scheduler")
        },
    }
    process: ServiceProcess = start("standalone", env, tmp_path)
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    try:
        await wait_healthy(process, gateway)
        yield gateway
    finally:
        assert process.terminate() == 0, process.log()


@pytest.fixture
async def proxy(standalone: str) -> AsyncIterator[tuple[GatingProxy, str]]:
    gate = GatingProxy(standalone)
    app = web.Application(client_max_size=2 * CHUNK)
    app.router.add_route("*", "/{tail:.*}", gate.forward)
    server = TestServer(app)
    await server.start_server()
    try:
        yield gate, str(server.make_url("")).rstrip("/")
    finally:
        gate.close()
        await server.close()


def remembered(cache: Path) -> list[Path]:
    """The resume files the uploader left in ``cache``."""
    return list(cache.glob("upload-*.json"))


async def cli(film: Path, url: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vod_client", "upload", str(film), "--title", "Killed and back",
        "--url", url, "--parallel", "2",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_killed_upload_resumes_with_only_the_missing_chunks(
    standalone: str, proxy: tuple[GatingProxy, str], tmp_path: Path
) -> None:
    gate, url = proxy
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{standalone}/api/v1/users", json={"username": "cli_user", "password": PASSWORD}
        ) as response,
    ):
        assert response.status == 201, await response.text()
    film = tmp_path / "film.mp4"
    data = os.urandom(3 * CHUNK + 1000)
    film.write_bytes(data)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "VOD_USERNAME": "cli_user",
        "VOD_PASSWORD": PASSWORD,
        "VOD_CACHE_DIR": str(tmp_path / "cache"),
    }

    first = await cli(film, url, env)
    await asyncio.wait_for(gate.first_chunk_stored.wait(), timeout=60)
    assert remembered(tmp_path / "cache")
    first.send_signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    assert len(gate.chunks_passed) == 1

    gate.holding = False
    second = await cli(film, url, env)
    out, err = await asyncio.wait_for(second.communicate(), timeout=60)
    assert second.returncode == 0, err.decode()
    assert "resuming: 8.0 MiB already sent" in err.decode()
    video = json.loads(out)
    assert video["content_hash"] == content_hash(data)
    # Every chunk went through once: the kept one was not sent again.
    assert sorted(gate.chunks_passed) == [0, 1, 2, 3]
    assert not remembered(tmp_path / "cache")
