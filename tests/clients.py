"""Clients of the public API for tests: what a browser or app would do, step by step."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

from shared.content_hash import content_hash
from tests.stack import Stack
from vod_client import BytesSource, VodClient

MIB = 1024 * 1024
CHUNK = 8 * MIB


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pieces(data: bytes, chunk_size: int = CHUNK) -> list[bytes]:
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


def new_upload(data: bytes, **overrides: Any) -> dict[str, Any]:
    return {"filename": "film.mp4", "size": len(data), "content_hash": content_hash(data)} | (
        overrides
    )


class Uploader:
    """One signed-in client of the upload API, through the gateway."""

    def __init__(self, stack: Stack, auth: dict[str, str]) -> None:
        self.gateway = stack.gateway
        self.auth = auth

    async def create(self, body: Any) -> Any:
        return await self.gateway.post("/api/v1/uploads", json=body, headers=self.auth)

    async def start(self, data: bytes, **overrides: Any) -> dict[str, Any]:
        response = await self.create(new_upload(data, **overrides))
        assert response.status == 201, await response.text()
        created: dict[str, Any] = await response.json()
        return created

    async def put(
        self, upload_id: str, index: int, body: bytes, checksum: str | None = None
    ) -> Any:
        return await self.gateway.put(
            f"/api/v1/uploads/{upload_id}/chunks/{index}",
            # A file object: aiohttp warns about sending megabytes of raw bytes.
            data=io.BytesIO(body),
            headers={**self.auth, "X-Chunk-SHA256": checksum or sha256(body)},
        )

    async def put_ok(self, upload_id: str, index: int, body: bytes) -> None:
        response = await self.put(upload_id, index, body)
        assert response.status == 204, await response.text()

    async def get(self, upload_id: str) -> Any:
        return await self.gateway.get(f"/api/v1/uploads/{upload_id}", headers=self.auth)

    async def status(self, upload_id: str) -> dict[str, Any]:
        response = await self.get(upload_id)
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    async def complete(self, upload_id: str, body: Any = None) -> Any:
        return await self.gateway.post(
            f"/api/v1/uploads/{upload_id}/complete", json=body, headers=self.auth
        )

    async def delete(self, upload_id: str) -> Any:
        return await self.gateway.delete(f"/api/v1/uploads/{upload_id}", headers=self.auth)

    def client(self) -> VodClient:
        """The shipped client (``vod_client``), signed in as this uploader, on the test
        gateway's session."""
        token = self.auth["Authorization"].removeprefix("Bearer ")
        return VodClient(str(self.gateway.make_url("")), session=self.gateway.session, token=token)

    async def upload(self, data: bytes) -> dict[str, Any]:
        """The whole file through ``vod_client``, chunks in parallel; the completed upload."""
        result = await self.client().upload(BytesSource(data, "film.mp4"))
        return {
            "upload_id": result.upload_id,
            "state": "complete",
            "content_hash": result.content_hash,
            "size": result.size,
            "instant": result.instant,
        }


class Publisher:
    """A signed-in user who uploads files and publishes them as videos."""

    def __init__(self, stack: Stack, username: str, auth: dict[str, str]) -> None:
        self.stack = stack
        self.username = username
        self.auth = auth
        self.uploader = Uploader(stack, auth)

    async def upload(self, data: bytes | None = None) -> str:
        completed = await self.uploader.upload(data or os.urandom(10_000))
        upload_id: str = completed["upload_id"]
        return upload_id

    async def publish(self, title: str = "A film", description: str = "", **extra: Any) -> Any:
        upload_id = extra.pop("upload_id", None) or await self.upload()
        body = {"title": title, "description": description, "upload_id": upload_id} | extra
        return await self.stack.gateway.post("/api/v1/videos", json=body, headers=self.auth)

    async def video(self, title: str = "A film", description: str = "") -> dict[str, Any]:
        response = await self.publish(title, description)
        assert response.status == 201, await response.text()
        body: dict[str, Any] = await response.json()
        return body
