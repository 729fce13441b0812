"""A stream_service restart in the middle of an upload loses nothing.

``python -m stream_service`` as a real process on MariaDB, Redis and RabbitMQ, called
directly as the gateway would (internal token and identity headers): half the chunks go
to the first process, which is stopped with SIGTERM; a second process reports exactly the
missing chunks, takes them, and assembles the verified file.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.auth import Identity
from shared.content_hash import content_hash
from shared.db import new_id
from shared.kv import open_kv
from shared.layout import content_blob_key
from tests.conftest import INTERNAL_TOKEN
from tests.e2e.processes import ServiceProcess, free_port, start, wait_healthy

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
CHUNK = 8 * MIB


@pytest.fixture
def service_env(real_backends_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    port = free_port()
    return {
        **real_backends_env,
        "VOD_DB_MIGRATE": "1",
        "VOD_BLOB_URL": f"file://{tmp_path}/blobs",
        "VOD_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "VOD_HOST": "127.0.0.1",
        "VOD_STREAM_PORT": str(port),
        "VOD_API_URL": "http://127.0.0.1:1",
        "VOD_STREAM_URL": f"http://127.0.0.1:{port}",
        "VOD_SCHEDULER_URL": "http://127.0.0.1:1",
        "VOD_SHUTDOWN_TIMEOUT": "5",
    }


@pytest.fixture
async def launch(
    service_env: dict[str, str], tmp_path: Path
) -> AsyncIterator[Callable[[str], Any]]:
    """Starts a stream_service process and waits until it answers; stops all at the end."""
    started: list[ServiceProcess] = []

    async def launch(name: str) -> ServiceProcess:
        process = start("stream_service", service_env, tmp_path, name=name)
        started.append(process)
        await wait_healthy(process, service_env["VOD_STREAM_URL"])
        return process

    yield launch
    for process in started:
        process.terminate()
    kv = await open_kv(service_env["VOD_REDIS_URL"], service_env["VOD_NAMESPACE"])
    try:
        await kv.delete_namespace()
    finally:
        await kv.close()


async def put_chunk(
    session: aiohttp.ClientSession, url: str, upload_id: str, index: int, body: bytes
) -> None:
    async with session.put(
        f"{url}/api/v1/uploads/{upload_id}/chunks/{index}",
        data=io.BytesIO(body),
        headers={"X-Chunk-SHA256": hashlib.sha256(body).hexdigest()},
    ) as response:
        assert response.status == 204, await response.text()


async def test_restart_mid_upload_loses_nothing(
    launch: Callable[[str], Any], service_env: dict[str, str], tmp_path: Path
) -> None:
    url = service_env["VOD_STREAM_URL"]
    owner = Identity(
        user_id=new_id(), username="restart", token_id="t", family_id="f", expires_at=0
    )
    headers = {"X-Internal-Token": INTERNAL_TOKEN, **owner.to_headers()}
    data = os.urandom(3 * CHUNK + 1000)
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]

    async with aiohttp.ClientSession(headers=headers) as session:
        first = await launch("stream-before")
        async with session.post(
            f"{url}/api/v1/uploads",
            json={"filename": "film.mp4", "size": len(data), "content_hash": content_hash(data)},
        ) as response:
            assert response.status == 201, await response.text()
            upload_id = (await response.json())["upload_id"]
        await put_chunk(session, url, upload_id, 0, chunks[0])
        await put_chunk(session, url, upload_id, 2, chunks[2])
        assert first.terminate() == 0, first.log()

        await launch("stream-after")
        async with session.get(f"{url}/api/v1/uploads/{upload_id}") as response:
            status = await response.json()
        assert (status["received"], status["missing"]) == ([0, 2], [1, 3])
        for index in status["missing"]:
            await put_chunk(session, url, upload_id, index, chunks[index])
        async with session.post(f"{url}/api/v1/uploads/{upload_id}/complete") as response:
            assert response.status == 200, await response.text()
            completed = await response.json()

    assert completed["content_hash"] == content_hash(data)
    stored = tmp_path / "blobs" / content_blob_key(completed["content_hash"])
    assert content_hash(stored.read_bytes()) == content_hash(data)
