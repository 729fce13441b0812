"""tus uploads over the native upload machinery: the rules of each tus request.

A tus upload is created, sized, counted against the quota, completed, deduplicated and
announced (``upload.completed``) by ``UploadService``, exactly as a native one; only the
way bytes arrive differs. Each PATCH streams its body into one blob, a *segment* named
by the offset it starts at plus a random suffix (``uploads/<id>/tus-<offset>-<random>``),
and only then records it in Redis, at the offset it was sent for. So:

- a PATCH whose checksum fails, that sends more than the upload lacks, or that loses a
  race for its offset leaves nothing behind (the blob write is atomic, a refused record
  deletes its segment);
- a PATCH cut off mid-body without a checksum keeps what arrived (tus asks servers to
  store as much as they can): the client's HEAD then answers the offset to resume from.
  The storing runs in a task of its own, so it finishes even when aiohttp cancels the
  handler of a vanished client;
- the PATCH that brings the last byte completes the upload: the segments are hashed into
  the content hash, then verified and written (or found stored: dedup) as
  ``UploadService.complete_parts``. If that fails, the next HEAD tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp.http_exceptions import HttpProcessingError

from shared.blobs import BlobStore
from shared.db.schema import UPLOAD_EXPIRED
from shared.errors import AppError, ConflictError, ForbiddenError, PayloadTooLargeError
from shared.kv import KeyValueStore
from shared.layout import is_upload_id
from stream_service.repositories.upload_state import UploadState
from stream_service.services.uploads import (
    UploadService,
    upload_complete,
    upload_completing,
    upload_not_found,
)
from stream_service.storage.verification import OFFLOAD_HASH_BYTES
from stream_service.tus.protocol import (
    Checksum,
    ChecksumMismatchError,
    Metadata,
    UploadExpiredError,
)
from stream_service.tus.state import (
    AppendOutcome,
    TerminateOutcome,
    TusStateStore,
    TusUpload,
    segment_blob_key,
)

logger = logging.getLogger(__name__)

# Zero-padded so a listing of the upload's blobs sorts in file order (20 GiB has 11 digits).
OFFSET_DIGITS: Final = 15


@dataclass(frozen=True, slots=True, kw_only=True)
class TusStatus:
    """What HEAD and PATCH answer."""

    id: str
    offset: int
    length: int
    metadata: str
    # None once complete: a finished upload does not expire.
    expires_at: datetime | None

    @property
    def complete(self) -> bool:
        return self.expires_at is None


def offset_mismatch(expected: int) -> ConflictError:
    return ConflictError(
        f"The upload is at offset {expected}; send the bytes from there (HEAD tells).",
        code="upload_offset_mismatch",
        extra={"expected_offset": expected},
    )


def _status(tus: TusUpload) -> TusStatus:
    upload = tus.upload
    return TusStatus(
        id=upload.id,
        offset=tus.offset,
        length=upload.size,
        metadata=tus.metadata,
        expires_at=None if upload.complete else upload.expires_at,
    )


class _Cut:
    """Set when the body ended because the connection did."""

    def __init__(self) -> None:
        self.happened = False


class TusService:
    def __init__(
        self,
        *,
        uploads: UploadService,
        kv: KeyValueStore,
        blobs: BlobStore,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._uploads = uploads
        self._state = TusStateStore(kv)
        self._blobs = blobs
        self.clock = clock
        # Appends carried on after their client vanished; awaited at shutdown.
        self._in_flight: set[asyncio.Task[TusStatus]] = set()

    @property
    def in_flight(self) -> int:
        """PATCH bodies being stored right now (their clients may have left)."""
        return len(self._in_flight)

    async def close(self) -> None:
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    # -- the operations ----------------------------------------------------------------

    async def create(self, owner_id: str, *, length: int, metadata: Metadata) -> TusStatus:
        upload = self._uploads.new_upload_state(owner_id, filename=metadata.filename, size=length)
        fields = self._state.encode(upload, metadata=metadata.raw, filetype=metadata.filetype)
        await self._uploads.admit(upload, fields=fields)
        return TusStatus(
            id=upload.id,
            offset=0,
            length=length,
            metadata=metadata.raw,
            expires_at=upload.expires_at,
        )

    async def status(self, owner_id: str, upload_id: str) -> TusStatus:
        found = await self._find(owner_id, upload_id)
        if isinstance(found, TusStatus):
            return found
        if found.offset == found.upload.size:
            # Every byte is in but completing failed last time (or is under way elsewhere).
            with contextlib.suppress(ConflictError):
                return await self._shielded(self._complete(found.upload, found.metadata))
        return _status(found)

    async def append(
        self,
        owner_id: str,
        upload_id: str,
        *,
        offset: int,
        content_length: int | None,
        checksum: Checksum | None,
        body: AsyncIterable[bytes],
    ) -> TusStatus:
        found = await self._find(owner_id, upload_id)
        if isinstance(found, TusStatus):
            if offset != found.offset:
                raise offset_mismatch(found.offset)
            return found  # complete: an empty PATCH at its end changes nothing
        if offset != found.offset:
            raise offset_mismatch(found.offset)
        lacking = found.upload.size - offset
        if content_length is not None and content_length > lacking:
            raise _beyond_length(found.upload.size)
        return await self._shielded(self._store(found, checksum, body))

    async def terminate(self, owner_id: str, upload_id: str) -> None:
        found = await self._find(owner_id, upload_id, expired_ok=True)
        if isinstance(found, TusStatus):
            raise upload_complete()
        outcome = await self._state.terminate(upload_id, owner_id=owner_id)
        if outcome is TerminateOutcome.MISSING:
            raise upload_not_found(upload_id)
        if outcome is TerminateOutcome.COMPLETE:
            raise upload_complete()
        if outcome is TerminateOutcome.COMPLETING:
            raise upload_completing()
        # The state is gone first: a PATCH landing now finds no upload and drops its segment.
        await self._uploads.discard(upload_id)

    # -- storing a PATCH ---------------------------------------------------------------

    async def _shielded(self, work: Coroutine[Any, Any, TusStatus]) -> TusStatus:
        """Runs ``work`` to its end even if the caller is cancelled (the client left)."""
        task = asyncio.create_task(work, name="tus-append")
        self._in_flight.add(task)
        task.add_done_callback(_forget(self._in_flight))
        return await asyncio.shield(task)

    async def _store(
        self, tus: TusUpload, checksum: Checksum | None, body: AsyncIterable[bytes]
    ) -> TusStatus:
        upload = tus.upload
        name = f"tus-{tus.offset:0{OFFSET_DIGITS}d}-{secrets.token_hex(4)}"
        key = segment_blob_key(upload.id, name)
        cut = _Cut()
        source = _segment(body, offset=tus.offset, length=upload.size, checksum=checksum, cut=cut)
        info = await self._blobs.write(key, source)
        if info.size == 0:
            await self._blobs.delete(key)
            if tus.offset < upload.size:
                return _status(tus)
            return await self._complete(upload, tus.metadata)
        expires_at = self.clock() + timedelta(seconds=self._uploads.state_ttl)
        outcome, offset = await self._state.append(
            upload.id,
            owner_id=upload.owner_id,
            offset=tus.offset,
            length=info.size,
            segment=name,
            ttl=self._uploads.state_ttl,
            expires_at=expires_at,
        )
        if outcome is not AppendOutcome.APPENDED:
            await self._blobs.delete(key)
            raise _refusal(outcome, upload.id, offset)
        if cut.happened:
            logger.info(
                "tus upload %s: connection lost, kept %d bytes at offset %d",
                upload.id,
                info.size,
                tus.offset,
                extra={"upload_id": upload.id},
            )
        if offset < upload.size:
            return TusStatus(
                id=upload.id,
                offset=offset,
                length=upload.size,
                metadata=tus.metadata,
                expires_at=expires_at,
            )
        return await self._complete(upload, tus.metadata)

    async def _complete(self, upload: UploadState, metadata: str) -> TusStatus:
        """Every byte is in: the native completion makes the file from the segments."""
        names = await self._state.segments(upload.id)
        keys = [segment_blob_key(upload.id, name) for name in names]
        await self._uploads.complete_parts(upload, keys)
        await self._state.forget_segments(upload.id)
        return TusStatus(
            id=upload.id, offset=upload.size, length=upload.size, metadata=metadata, expires_at=None
        )

    # -- helpers -------------------------------------------------------------------------

    async def _find(
        self, owner_id: str, upload_id: str, *, expired_ok: bool = False
    ) -> TusUpload | TusStatus:
        """The tus upload in progress, or the status of a finished one; 404 if there is
        neither, 403 if it is someone else's, 410 if it expired."""
        if not is_upload_id(upload_id):
            raise upload_not_found(upload_id)
        tus = await self._state.load(upload_id)
        if tus is None:
            # Its Redis state expired or never existed: a finished upload is in the database.
            view = await self._uploads.status(owner_id, upload_id)
            if view.completed_at is None:
                raise upload_not_found(upload_id)  # a native upload in progress
            if view.state == UPLOAD_EXPIRED:
                raise _finished_but_expired(upload_id)
            return TusStatus(
                id=view.id, offset=view.size, length=view.size, metadata="", expires_at=None
            )
        if tus.upload.owner_id != owner_id:
            raise ForbiddenError("This upload belongs to someone else.", code="upload_forbidden")
        if tus.upload.complete:
            # The database's record is the truth once it exists: its file may be gone.
            if (await self._uploads.status(owner_id, upload_id)).state == UPLOAD_EXPIRED:
                raise _finished_but_expired(upload_id)
            return TusStatus(
                id=upload_id,
                offset=tus.upload.size,
                length=tus.upload.size,
                metadata=tus.metadata,
                expires_at=None,
            )
        if not expired_ok and tus.upload.expires_at <= self.clock():
            raise UploadExpiredError(
                f"Upload {upload_id} expired at {tus.upload.expires_at.isoformat()}; "
                "start a new one.",
            )
        return tus


def _finished_but_expired(upload_id: str) -> UploadExpiredError:
    return UploadExpiredError(
        f"Upload {upload_id} finished, but its file was removed because no video used it "
        "in time; upload the file again."
    )


def _forget(tasks: set[asyncio.Task[TusStatus]]) -> Callable[[asyncio.Task[TusStatus]], None]:
    def done(task: asyncio.Task[TusStatus]) -> None:
        tasks.discard(task)
        # Retrieved here: a task whose client left has nobody else to read its outcome.
        if not task.cancelled():
            task.exception()

    return done


def _beyond_length(length: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"The bytes go past the upload's Upload-Length of {length}; nothing was stored.",
        code="upload_length_exceeded",
        extra={"upload_length": length},
    )


def _refusal(outcome: AppendOutcome, upload_id: str, offset: int) -> AppError:
    if outcome is AppendOutcome.MOVED:
        return offset_mismatch(offset)
    if outcome is AppendOutcome.COMPLETE:
        return upload_complete()
    if outcome is AppendOutcome.COMPLETING:
        return upload_completing()
    # Terminated or expired while the bytes arrived: nothing would ever read them.
    return upload_not_found(upload_id)


async def _segment(
    body: AsyncIterable[bytes],
    *,
    offset: int,
    length: int,
    checksum: Checksum | None,
    cut: _Cut,
) -> AsyncGenerator[bytes, None]:
    """``body``, sent for ``offset`` of an upload of ``length`` bytes, on its way to the
    blob store: refused (so nothing is stored) past ``length`` or on a checksum mismatch;
    ended early, keeping what arrived, when the connection drops and there is no checksum
    the bytes could be checked against."""
    digest = checksum.new_hash() if checksum is not None else None
    received = 0
    try:
        async for piece in body:
            received += len(piece)
            if offset + received > length:
                raise _beyond_length(length)
            if digest is not None:
                if len(piece) >= OFFLOAD_HASH_BYTES:
                    await asyncio.to_thread(digest.update, piece)
                else:
                    digest.update(piece)
            yield piece
    except (ConnectionResetError, HttpProcessingError):
        if digest is not None:
            raise
        cut.happened = True
        return
    if (
        digest is not None
        and checksum is not None
        and not hmac.compare_digest(digest.digest(), checksum.digest)
    ):
        raise ChecksumMismatchError(
            f"The body's {checksum.algorithm} is not the one in Upload-Checksum; "
            "nothing was stored. Send it again.",
        )
