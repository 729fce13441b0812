"""A blocking client of the same public API, over any ``requests``-like session: for
programs that are not asyncio (the locust load test, whose users are gevent greenlets, and
scripts). The async ``VodClient`` stays the CLI's; this one shares its error type, its
digests and its upload protocol (create, chunk PUTs with ``X-Chunk-SHA256``, complete,
instant-upload proof), sends chunks one after the other and does not retry: a load test
wants to see what failed.

    import requests
    client = SyncVodClient("http://127.0.0.1:8000", requests.Session())
    client.sign_up("alice", "secret-password")
    video = client.publish(BytesSource(data, "film.mp4"), title="A film")
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from vod_client.client import DEFAULT_CHUNK_SIZE, PROBLEM_TYPES, ApiError, _api_error
from vod_client.source import Source, compute_digests

MIB: Final = 1024 * 1024
NO_CONTENT: Final = 204


class HttpResponse(Protocol):
    """What the client reads of an answer (``requests.Response`` has it all)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> bytes: ...

    def json(self) -> Any: ...


class HttpSession(Protocol):
    """``requests.Session`` or anything with its ``request`` (locust's ``HttpSession``)."""

    def request(self, method: str, url: str, **kwargs: Any) -> HttpResponse: ...


class SyncVodClient:
    """One user's blocking client; ``token`` is set by ``sign_in``."""

    def __init__(self, base_url: str, session: HttpSession, *, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.token = token

    # -- requests ----------------------------------------------------------------------

    def send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        ok: Sequence[int] = (200, 201),
    ) -> HttpResponse:
        """One request; the response when its status is in ``ok``, else ``ApiError``."""
        all_headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        all_headers |= dict(headers or {})
        extra: dict[str, Any] = {"headers": all_headers}
        if json is not None:
            extra["json"] = json
        if data is not None:
            extra["data"] = data
        response = self.session.request(method, self.base_url + path, **extra)
        if response.status_code not in ok:
            raise error_of(response)
        return response

    def request(
        self, method: str, path: str, *, json: Any = None, ok: Sequence[int] = (200, 201)
    ) -> Any:
        """One JSON request; the decoded body (None when empty)."""
        response = self.send(method, path, json=json, ok=ok)
        return None if response.status_code == NO_CONTENT else response.json()

    # -- accounts ----------------------------------------------------------------------

    def sign_up(self, username: str, password: str) -> dict[str, Any]:
        body = {"username": username, "password": password}
        return dict(self.request("POST", "/api/v1/users", json=body))

    def sign_in(self, username: str, password: str) -> str:
        body = {"username": username, "password": password}
        tokens = self.request("POST", "/api/v1/sessions", json=body)
        self.token = str(tokens["access_token"])
        return self.token

    # -- reading -----------------------------------------------------------------------

    def list_videos(self, *, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        return dict(self.request("GET", "/api/v1/videos" + query))

    def video(self, video_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/v1/videos/{video_id}"))

    def comments(self, video_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/v1/videos/{video_id}/comments"))

    def danmaku(self, video_id: str, *, from_ms: int = 0) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/v1/videos/{video_id}/danmaku?from_ms={from_ms}"))

    def read_range(self, video_id: str, first: int, length: int) -> bytes:
        """``length`` bytes of the video from ``first`` (one ``Range`` GET, 206)."""
        response = self.send(
            "GET",
            f"/api/v1/videos/{video_id}/stream",
            headers={"Range": f"bytes={first}-{first + length - 1}"},
            ok=(206,),
        )
        return response.content

    # -- writing -----------------------------------------------------------------------

    def comment(self, video_id: str, content: str) -> dict[str, Any]:
        path = f"/api/v1/videos/{video_id}/comments"
        return dict(self.request("POST", path, json={"content": content}))

    def send_danmaku(
        self,
        video_id: str,
        content: str,
        *,
        offset_ms: int,
        mode: str = "scroll",
        color: str = "#ffffff",
    ) -> dict[str, Any]:
        body = {"offset_ms": offset_ms, "content": content, "mode": mode, "color": color}
        return dict(self.request("POST", f"/api/v1/videos/{video_id}/danmaku", json=body))

    def publish(
        self,
        source: Source,
        *,
        title: str,
        description: str = "",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> dict[str, Any]:
        """Uploads ``source`` chunk by chunk, completes it, publishes it: the new video."""
        upload_id = self.upload(source, chunk_size=chunk_size)
        body = {"upload_id": upload_id, "title": title, "description": description}
        return dict(self.request("POST", "/api/v1/videos", json=body))

    def upload(self, source: Source, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
        """The completed upload's id (an instant one when the server has the bytes)."""
        digests = compute_digests(source, chunk_size)
        created = self.request(
            "POST",
            "/api/v1/uploads",
            json={
                "filename": source.name,
                "size": source.size,
                "content_hash": digests.content_hash,
                "chunk_size": chunk_size,
            },
        )
        upload_id = str(created["upload_id"])
        if created.get("instant"):
            challenge = created["challenge"]
            proof = source.read(int(challenge["offset"]), int(challenge["length"]))
            self.complete(upload_id, hashlib.sha256(proof).hexdigest())
            return upload_id
        for index, checksum in enumerate(digests.chunk_sha256):
            start = index * chunk_size
            data = source.read(start, min(chunk_size, source.size - start))
            self.send(
                "PUT",
                f"/api/v1/uploads/{upload_id}/chunks/{index}",
                data=data,
                headers={"X-Chunk-SHA256": checksum},
                ok=(NO_CONTENT,),
            )
        self.complete(upload_id)
        return upload_id

    def complete(self, upload_id: str, proof: str | None = None) -> dict[str, Any]:
        body = {"proof": proof} if proof else {}
        return dict(self.request("POST", f"/api/v1/uploads/{upload_id}/complete", json=body))


def error_of(response: HttpResponse) -> ApiError:
    """The ``ApiError`` of a non-2xx answer (its problem document's ``code``)."""
    document: dict[str, Any] = {}
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    if content_type in PROBLEM_TYPES:
        try:
            decoded = response.json()
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            document = decoded
    return _api_error(response.status_code, document)
