"""An async client of vod's public API (aiohttp): sign in, upload a file in parallel chunks
with resume and instant upload, publish it as a video.

    async with VodClient("http://127.0.0.1:8000") as client:
        await client.sign_in("alice", "secret-password")
        with FileSource(Path("film.mp4")) as source:
            video = await client.publish(source, title="A film")

Every non-2xx answer is an ``ApiError`` carrying the problem document's ``code``; a
gateway that cannot be reached is an ``OfflineError``. Chunk PUTs are retried (with
backoff, honouring ``Retry-After``) on dropped connections, 429, 502, 503 and 504: a
flaky link is what chunked upload is for.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import aiohttp

from vod_client.resume import ResumeStore
from vod_client.source import Digests, Source, compute_digests

logger = logging.getLogger(__name__)

MIB: Final = 1024 * 1024
DEFAULT_CHUNK_SIZE: Final = 8 * MIB
DEFAULT_PARALLEL: Final = 4
# Pieces of a chunk handed to the connection: fine-grained enough for a smooth progress bar.
SEND_PIECE_BYTES: Final = 256 * 1024
RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
DEFAULT_RETRIES: Final = 4
DEFAULT_BACKOFF: Final = 0.5
MAX_RETRY_AFTER: Final = 30.0
# A complete that reports chunks lost in storage gets them again, this many times.
COMPLETION_ROUNDS: Final = 3
PROBLEM_TYPES: Final = ("application/problem+json", "application/json")


class ApiError(Exception):
    """The gateway answered with an error (a problem document)."""

    def __init__(self, status: int, code: str, detail: str, body: Mapping[str, Any]) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.body = dict(body)


class OfflineError(Exception):
    """The gateway could not be reached (or the connection kept dropping)."""


@dataclass(frozen=True, slots=True)
class UploadResult:
    upload_id: str
    content_hash: str
    size: int
    instant: bool
    # The chunks this call sent (a resumed upload sends only those the server lacked).
    sent_chunks: tuple[int, ...]
    resumed: bool


@dataclass(slots=True)
class _Plan:
    upload_id: str
    chunk_size: int
    missing: list[int]
    resumed: bool
    challenge: Mapping[str, int] | None = None
    sent: list[int] = field(default_factory=list)


ProgressCallback = Callable[[int], None]
ChunkHook = Callable[[int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Job:
    source: Source
    digests: Digests
    plan: _Plan
    parallel: int
    on_progress: ProgressCallback | None
    after_chunk: ChunkHook | None


class VodClient:
    """One user's client. Pass ``session`` to share a session (tests, load tests); else
    the client opens and closes its own inside ``async with``."""

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        token: str | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._session = session
        self._owns_session = session is None
        self._retries = retries
        self._backoff = backoff

    async def __aenter__(self) -> Self:
        if self._session is None:
            # No total timeout: a large chunk on a slow link takes as long as it takes.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the client inside 'async with'")
        return self._session

    # -- requests ----------------------------------------------------------------------

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return headers | dict(extra or {})

    async def request(
        self, method: str, path: str, *, json: Any = None, ok: Sequence[int] = (200, 201)
    ) -> tuple[int, Any]:
        """One JSON request; the status and the decoded body (None when empty)."""
        try:
            async with self.session.request(
                method, self.base_url + path, json=json, headers=self._headers()
            ) as response:
                body = await _body(response)
        except aiohttp.ClientConnectionError as exc:
            raise OfflineError(f"cannot reach {self.base_url}: {exc}") from exc
        if response.status not in ok:
            raise _api_error(response.status, body)
        return response.status, body

    async def sign_in(self, username: str, password: str) -> str:
        _, tokens = await self.request(
            "POST", "/api/v1/sessions", json={"username": username, "password": password}
        )
        self.token = str(tokens["access_token"])
        return self.token

    async def create_upload(
        self, *, filename: str, size: int, content_hash: str, chunk_size: int
    ) -> dict[str, Any]:
        _, body = await self.request(
            "POST",
            "/api/v1/uploads",
            json={
                "filename": filename,
                "size": size,
                "content_hash": content_hash,
                "chunk_size": chunk_size,
            },
        )
        return dict(body)

    async def upload_status(self, upload_id: str) -> dict[str, Any]:
        _, body = await self.request("GET", f"/api/v1/uploads/{upload_id}")
        return dict(body)

    async def complete_upload(self, upload_id: str, proof: str | None = None) -> dict[str, Any]:
        _, body = await self.request(
            "POST",
            f"/api/v1/uploads/{upload_id}/complete",
            json={"proof": proof} if proof else {},
        )
        return dict(body)

    async def delete_upload(self, upload_id: str) -> None:
        await self.request("DELETE", f"/api/v1/uploads/{upload_id}", ok=(204,))

    async def create_video(
        self, *, upload_id: str, title: str, description: str = ""
    ) -> dict[str, Any]:
        _, body = await self.request(
            "POST",
            "/api/v1/videos",
            json={"upload_id": upload_id, "title": title, "description": description},
        )
        return dict(body)

    async def put_chunk(
        self,
        upload_id: str,
        index: int,
        data: bytes,
        checksum: str,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        """Sends one chunk, retrying what a flaky link or a busy server causes."""
        url = f"{self.base_url}/api/v1/uploads/{upload_id}/chunks/{index}"
        headers = self._headers({"X-Chunk-SHA256": checksum, "Content-Length": str(len(data))})
        for attempt in range(self._retries + 1):
            counted = _CountedBody(data, on_progress)
            try:
                body_pieces = counted.pieces()
                async with self.session.put(url, data=body_pieces, headers=headers) as response:
                    if response.status == 204:  # noqa: PLR2004
                        return
                    body = await _body(response)
            except aiohttp.ClientConnectionError as exc:
                counted.take_back()
                if attempt == self._retries:
                    raise OfflineError(
                        f"cannot reach {self.base_url} (chunk {index} not sent): {exc}"
                    ) from exc
                logger.info("chunk %d: %r; sending it again", index, exc)
                delay = self._backoff * 2**attempt
            else:
                counted.take_back()
                if response.status not in RETRY_STATUSES or attempt == self._retries:
                    raise _api_error(response.status, body)
                delay = _retry_after(response.headers.get("Retry-After")) or (
                    self._backoff * 2**attempt
                )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- whole files -------------------------------------------------------------------

    async def upload(
        self,
        source: Source,
        *,
        filename: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        parallel: int = DEFAULT_PARALLEL,
        resume: ResumeStore | None = None,
        digests: Digests | None = None,
        on_progress: ProgressCallback | None = None,
        on_size: Callable[[int, int], None] | None = None,
        after_chunk: ChunkHook | None = None,
    ) -> UploadResult:
        """Uploads ``source`` (resuming a remembered upload of the same bytes), completes it.

        ``on_size(total, already_there)`` is called once the work is known; ``after_chunk``
        after each chunk is stored (the tests stop an upload there).
        """
        if digests is None:
            digests = await asyncio.to_thread(compute_digests, source, chunk_size)
        plan = await self._plan(source, digests, filename or source.name, resume)
        if on_size is not None:
            missing_bytes = sum(
                _chunk_length(source.size, plan.chunk_size, index) for index in plan.missing
            )
            on_size(source.size, 0 if plan.challenge else source.size - missing_bytes)
        if plan.challenge is not None:
            completed = await self._prove(source, plan.upload_id, plan.challenge)
        else:
            completed = await self._send_and_complete(
                _Job(source, digests, plan, parallel, on_progress, after_chunk)
            )
        if resume is not None:
            resume.forget(self.base_url, digests.content_hash)
        return UploadResult(
            upload_id=plan.upload_id,
            content_hash=str(completed["content_hash"]),
            size=int(completed["size"]),
            instant=plan.challenge is not None,
            sent_chunks=tuple(plan.sent),
            resumed=plan.resumed,
        )

    async def publish(
        self, source: Source, *, title: str, description: str = "", **upload: Any
    ) -> dict[str, Any]:
        """``upload`` then ``create_video``: the new video."""
        result = await self.upload(source, **upload)
        return await self.create_video(
            upload_id=result.upload_id, title=title, description=description
        )

    async def _plan(
        self, source: Source, digests: Digests, filename: str, resume: ResumeStore | None
    ) -> _Plan:
        remembered = resume.load(self.base_url, digests.content_hash) if resume else None
        if remembered is not None and remembered.get("size") == source.size:
            plan = await self._resumed(str(remembered.get("upload_id")), digests)
            if plan is not None:
                return plan
        created = await self.create_upload(
            filename=filename,
            size=source.size,
            content_hash=digests.content_hash,
            chunk_size=digests.chunk_size,
        )
        plan = _Plan(
            upload_id=str(created["upload_id"]),
            chunk_size=int(created.get("chunk_size", digests.chunk_size)),
            missing=list(range(digests.total_chunks)),
            resumed=False,
            challenge=created.get("challenge") if created.get("instant") else None,
        )
        if resume is not None:
            resume.save(
                self.base_url,
                digests.content_hash,
                {"upload_id": plan.upload_id, "size": source.size, "filename": filename},
            )
        return plan

    async def _resumed(self, upload_id: str, digests: Digests) -> _Plan | None:
        """The remembered upload, if the server still has it for us; else None."""
        try:
            status = await self.upload_status(upload_id)
        except ApiError as exc:
            if exc.status in (403, 404):  # expired, deleted, or someone else's
                return None
            raise
        if int(status["chunk_size"]) != digests.chunk_size:
            return None
        if status["state"] == "expired":  # finished, but its file was removed unused
            return None
        missing = [] if status["state"] == "complete" else list(status["missing"])
        return _Plan(
            upload_id=upload_id,
            chunk_size=digests.chunk_size,
            missing=missing,
            resumed=True,
            challenge=status.get("challenge") if status["state"] != "complete" else None,
        )

    async def _prove(
        self, source: Source, upload_id: str, challenge: Mapping[str, int]
    ) -> dict[str, Any]:
        """Instant upload: the SHA-256 of the byte range the server named."""
        data = await asyncio.to_thread(
            source.read, int(challenge["offset"]), int(challenge["length"])
        )
        return await self.complete_upload(upload_id, hashlib.sha256(data).hexdigest())

    async def _send_and_complete(self, job: _Job) -> dict[str, Any]:
        to_send = job.plan.missing
        for _ in range(COMPLETION_ROUNDS):
            await self._send(job, to_send)
            try:
                return await self.complete_upload(job.plan.upload_id)
            except ApiError as exc:
                # Lost in storage after they were acknowledged: the server asks for them.
                if exc.code != "chunks_missing":
                    raise
                to_send = [int(index) for index in exc.body.get("missing", [])]
        return await self.complete_upload(job.plan.upload_id)

    async def _send(self, job: _Job, indices: Sequence[int]) -> None:
        queue = list(reversed(indices))
        plan, size = job.plan, job.source.size

        async def sender() -> None:
            while queue:
                index = queue.pop()
                length = _chunk_length(size, plan.chunk_size, index)
                data = await asyncio.to_thread(job.source.read, index * plan.chunk_size, length)
                checksum = job.digests.chunk_sha256[index]
                await self.put_chunk(plan.upload_id, index, data, checksum, job.on_progress)
                plan.sent.append(index)
                if job.after_chunk is not None:
                    await job.after_chunk(index)

        async with asyncio.TaskGroup() as group:
            for number in range(max(1, min(job.parallel, len(indices)))):
                group.create_task(sender(), name=f"chunk-sender-{number}")


def _chunk_length(size: int, chunk_size: int, index: int) -> int:
    return min(chunk_size, size - index * chunk_size)


class _CountedBody:
    """A chunk's bytes in pieces, each reported to the progress bar as it goes out; a
    chunk that was not stored is taken back off the bar (it will be sent again)."""

    def __init__(self, data: bytes, on_progress: ProgressCallback | None) -> None:
        self._data = data
        self._on_progress = on_progress
        self._sent = 0

    async def pieces(self) -> AsyncIterator[memoryview]:
        view = memoryview(self._data)
        for start in range(0, len(view), SEND_PIECE_BYTES):
            piece = view[start : start + SEND_PIECE_BYTES]
            yield piece
            self._sent += len(piece)
            if self._on_progress is not None:
                self._on_progress(len(piece))

    def take_back(self) -> None:
        if self._sent and self._on_progress is not None:
            self._on_progress(-self._sent)
        self._sent = 0


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return None


async def _body(response: aiohttp.ClientResponse) -> Any:
    if response.status == 204:  # noqa: PLR2004
        return None
    if response.content_type in PROBLEM_TYPES:
        return await response.json(content_type=None)
    return {"detail": (await response.text())[:500]}


def _api_error(status: int, body: Any) -> ApiError:
    document = body if isinstance(body, dict) else {}
    return ApiError(
        status,
        str(document.get("code") or f"http_{status}"),
        str(document.get("detail") or document.get("title") or f"HTTP {status}"),
        document,
    )
