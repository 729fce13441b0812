"""Two stream_service replicas on the real MariaDB, Redis and RabbitMQ, one blob folder.

Nothing of an upload lives in a process: chunks sent to either replica, in parallel,
make one file, and what one replica finished the other reports. The replicas are called
directly, as the gateway would (internal token and identity headers).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select

from shared.auth import Identity
from shared.content_hash import content_hash
from shared.db import new_id, open_database
from shared.db.schema import outbox
from shared.events import UPLOAD_COMPLETED
from shared.kv import open_kv
from shared.layout import content_blob_key
from shared.resources import BLOBS, KV
from shared.settings import Settings
from stream_service.app import create_app
from stream_service.keys import UPLOADS
from stream_service.services.uploads import MAX_PROOF_FAILURES
from tests.api.test_uploads import Gate, announce_subscriptions

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
CHUNK = 8 * MIB
Client = TestClient[web.Request, web.Application]


@pytest.fixture
def settings(make_settings: Callable[..., Settings], real_backends_env: dict[str, str]) -> Settings:
    return make_settings(**real_backends_env)


@pytest.fixture
async def replicas(settings: Settings, aiohttp_client: Any) -> AsyncIterator[tuple[Client, Client]]:
    first: Client = await aiohttp_client(create_app(settings))
    second: Client = await aiohttp_client(create_app(settings))
    yield first, second
    kv = await open_kv(settings.redis_url, settings.namespace)
    try:
        await kv.delete_namespace()
    finally:
        await kv.close()


@pytest.fixture
def headers(internal_headers: dict[str, str]) -> dict[str, str]:
    owner = Identity(
        user_id=new_id(), username="uploader", token_id="t", family_id="f", expires_at=0
    )
    return {**internal_headers, **owner.to_headers()}


async def put_chunk(
    client: Client, headers: dict[str, str], upload_id: str, index: int, body: bytes
) -> int:
    response = await client.put(
        f"/api/v1/uploads/{upload_id}/chunks/{index}",
        data=io.BytesIO(body),
        headers={**headers, "X-Chunk-SHA256": hashlib.sha256(body).hexdigest()},
    )
    return response.status


async def completed_events(settings: Settings, upload_id: str) -> int:
    db = await open_database(settings.db_url)
    try:
        async with db.connect() as conn:
            payloads = (
                await conn.execute(
                    select(outbox.c.payload).where(outbox.c.routing_key == UPLOAD_COMPLETED)
                )
            ).scalars()
            return sum(orjson.loads(p)["data"]["upload_id"] == upload_id for p in payloads)
    finally:
        await db.close()


async def test_chunks_spread_over_two_replicas_make_one_file(
    replicas: tuple[Client, Client],
    headers: dict[str, str],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = replicas
    data = os.urandom(3 * CHUNK + 1000)
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    response = await first.post(
        "/api/v1/uploads",
        json={"filename": "film.mp4", "size": len(data), "content_hash": content_hash(data)},
        headers=headers,
    )
    assert response.status == 201, await response.text()
    upload_id = (await response.json())["upload_id"]

    # Every chunk to both replicas at once: each arrives twice, racing itself.
    statuses = await asyncio.gather(
        *(
            put_chunk(replica, headers, upload_id, index, chunk)
            for index, chunk in enumerate(chunks)
            for replica in (first, second)
        )
    )
    assert statuses == [204] * 2 * len(chunks)
    status = await (await second.get(f"/api/v1/uploads/{upload_id}", headers=headers)).json()
    assert (status["received"], status["missing"]) == ([0, 1, 2, 3], [])

    # Both replicas are asked to finish it: the first holds the lease mid-assembly while
    # the second waits for word through Redis, then answers what the first achieved.
    gate = Gate(first.app[BLOBS], upload_id)
    gate.install(monkeypatch)
    second_waits = asyncio.Event()
    monkeypatch.setattr(
        second.app[KV], "subscribe", announce_subscriptions(second.app[KV], second_waits)
    )
    async with asyncio.timeout(30):
        winner = asyncio.create_task(
            first.post(f"/api/v1/uploads/{upload_id}/complete", headers=headers)
        )
        await gate.reached.wait()
        loser = asyncio.create_task(
            second.post(f"/api/v1/uploads/{upload_id}/complete", headers=headers)
        )
        await second_waits.wait()
        gate.opened.set()
        responses = await asyncio.gather(winner, loser)
    assert [r.status for r in responses] == [200, 200]
    assert await completed_events(settings, upload_id) == 1

    for replica in (first, second):
        status = await (await replica.get(f"/api/v1/uploads/{upload_id}", headers=headers)).json()
        assert status["state"] == "complete"
    blob_root = Path(settings.blob_url.removeprefix("file://"))
    assert (blob_root / content_blob_key(content_hash(data))).read_bytes() == data
    for replica in (first, second):  # the chunks go after the answer
        await replica.app[UPLOADS].settled()
    assert not (blob_root / "uploads" / upload_id).exists()


async def test_one_challenge_and_one_count_of_wrong_proofs_across_replicas(
    replicas: tuple[Client, Client], headers: dict[str, str]
) -> None:
    first, second = replicas
    data = os.urandom(2 * MIB + 1000)

    async def whole() -> AsyncIterator[bytes]:
        yield data

    await first.app[BLOBS].write(content_blob_key(content_hash(data)), whole())
    body = {"filename": "film.mp4", "size": len(data), "content_hash": content_hash(data)}
    created = []
    for replica in (first, second, first):
        response = await replica.post("/api/v1/uploads", json=body, headers=headers)
        assert response.status == 200, await response.text()
        created.append(await response.json())
    challenge = created[0]["challenge"]
    assert [c["challenge"] for c in created] == [challenge] * 3

    def complete(index: int, proof: str) -> Any:
        replica = (first, second)[index % 2]
        upload_id = created[index % 3]["upload_id"]
        return replica.post(
            f"/api/v1/uploads/{upload_id}/complete", json={"proof": proof}, headers=headers
        )

    for attempt in range(MAX_PROOF_FAILURES):
        assert (await complete(attempt, "0" * 64)).status == 422
    offset, length = challenge["offset"], challenge["length"]
    refused = await complete(1, hashlib.sha256(data[offset : offset + length]).hexdigest())
    assert refused.status == 429, await refused.text()
    assert (await refused.json())["code"] == "proof_attempts_exhausted"
