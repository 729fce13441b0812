"""Chunked, parallel, resumable, deduplicated upload: the rules and the transaction.

Where things are: the upload in progress in Redis (``UploadStateStore``), each received
chunk as a blob under ``chunk_key``, the finished file once per content hash under
``content_blob_key``, the finished upload in the ``uploads`` table. Nothing lives in
this process, so any replica serves any request of any upload, and a restart loses
nothing.

Decisions a client can see:

- An empty file is refused (400): it is not a video, and nothing could stream it.
- A chunk is stored only whole and verified; a chunk received before is a no-op (its
  bytes are still checked, so a client learns of a corrupted resend, but the first copy
  stays).
- ``complete`` is idempotent: once complete, every call answers the finished upload. Two
  concurrent calls race for a lease; the loser waits for the winner and answers what it
  achieved (or, if the winner failed, tries itself).
- Instant upload is offered only when the stored file has the announced size. With a
  different size the hash cannot be right, and answering anything else would tell the
  caller the stored file's size: such an upload proceeds as a normal one (and will fail
  its content-hash check unless the client sends matching bytes). An instant upload may
  still be finished by sending its chunks instead of the proof.
- A user gets one challenge per content while they keep creating uploads of it, and
  ``MAX_PROOF_FAILURES`` wrong proofs; then 429 ``proof_attempts_exhausted`` until it
  expires (``stream_service.repositories.challenges``): the chunks still work.
- Even when the file is stored already (dedup), the chunks of a normal upload are hashed
  at completion: otherwise knowing a file's hash would be enough to claim it.
- A finished upload holds its file for the collector's grace period (from completion).
  Once the collector claims a file no video uses, that file's finished uploads are
  ``expired``: their state says so, and what would change them (a chunk, ``complete``,
  ``delete``) is 410 ``upload_expired``. A completion checks under the blob row's lock
  that the file is stored, and stores it again if the collector took it meanwhile
  (``_store_and_record``; ``scheduler_service.jobs.blob_collector`` says why).
- With a per-user quota, a new upload must fit beside what the user keeps (see
  ``stream_service.repositories.quota`` for what counts), or it is refused with 413
  ``quota_exceeded`` naming the bytes still free. Instant uploads count like any other.
- A user has at most ``max_uploads_in_progress`` uploads in progress (native and tus
  alike); one more is refused with 409 ``too_many_uploads``: a conflict with the state of
  their uploads, which the client resolves by completing or deleting one (waiting alone
  frees a slot only when one expires, a day after its last chunk), so no ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final

from shared.blobs import BlobNotFoundError, BlobStore, BlobStoreUnavailableError
from shared.bus import Event
from shared.content_hash import ContentHasher
from shared.db import Database, DuplicateKeyError, new_id
from shared.db.schema import UPLOAD_EXPIRED
from shared.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    GoneError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    UnprocessableError,
    ValidationError,
)
from shared.events import UPLOAD_COMPLETED
from shared.kv import KeyValueStore
from shared.layout import chunk_key, content_blob_key, is_upload_id, upload_prefix
from shared.outbox import add_event
from stream_service.repositories.blob_rows import BlobRows
from stream_service.repositories.challenges import AttemptOutcome, ChallengeStore
from stream_service.repositories.quota import (
    RESERVE_ATTEMPTS,
    UNLIMITED,
    QuotaLedger,
    ReserveOutcome,
)
from stream_service.repositories.upload_state import (
    COMPLETE,
    UPLOADING,
    Challenge,
    ChunkOutcome,
    DeleteOutcome,
    LeaseOutcome,
    UploadState,
    UploadStateStore,
    encode_state,
)
from stream_service.repositories.uploads import UploadRecord, UploadRecords
from stream_service.storage.read_ahead import read_ahead
from stream_service.storage.verification import (
    CheckedChunk,
    chunk_length_mismatch,
    verified_concatenation,
)

logger = logging.getLogger(__name__)

MIB: Final = 1024 * 1024
DEFAULT_CHUNK_SIZE: Final = 8 * MIB
# ≥ 8 MiB: every chunk but the last can be an S3 multipart part (5 MiB minimum).
MIN_CHUNK_SIZE: Final = 8 * MIB
# Large enough for fast links; small enough that a lost chunk costs little to resend.
MAX_CHUNK_SIZE: Final = 64 * MIB
# The instant-upload challenge: up to this many bytes at a random offset.
CHALLENGE_BYTES: Final = MIB
# Wrong proofs a user may send for one content while its challenge lives (a proof is a
# SHA-256: five guesses are as good as none, and a client with a bug learns of it).
MAX_PROOF_FAILURES: Final = 5
DEFAULT_MAX_UPLOADS_IN_PROGRESS: Final = 20
DEFAULT_STATE_TTL: Final = 24 * 3600.0
# The assembling replica renews its lease well before this runs out; a replica that
# dies mid-assembly blocks the upload for at most this long.
DEFAULT_COMPLETION_LEASE: Final = 30.0
# How long a second ``complete`` waits for the first before answering 409: under the
# gateway's upstream read timeout (60 s by default).
DEFAULT_COMPLETION_WAIT: Final = 20.0
# A waiter looks again this often even without a notice (the holder may have died).
NOTICE_RECHECK_SECONDS: Final = 2.0
RETRY_AFTER_SECONDS: Final = 5
# Pieces (4 MiB each) read and hashed ahead of the assembled file's writer, so reading and
# writing overlap: 1.5-2x faster assembly here, for 16 MiB per completion in progress.
ASSEMBLY_READ_AHEAD: Final = 4
# Pieces read when a file announced without a content hash is hashed: whole hash blocks.
ASSEMBLY_PIECE_BYTES: Final = 4 * MIB


# Storing the file again when the collector removed it mid-completion: once is enough
# (without a blob row nothing collects it), the third attempt is a safety bound.
STORE_ATTEMPTS: Final = 3


class StoredFileGoneError(Exception):
    """The file was found missing under its blob row's lock: nothing was recorded."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadView:
    """An upload as a client sees it."""

    id: str
    state: str
    filename: str
    size: int
    content_hash: str
    chunk_size: int
    total_chunks: int
    received: list[int]
    missing: list[int]
    instant: bool
    # Set while an instant upload waits for its proof.
    challenge: Challenge | None
    # None once finished: a finished upload has no timer of its own (its file is held for
    # the collector's grace period, then may be collected and the upload expire).
    expires_at: datetime | None
    completed_at: datetime | None


def upload_not_found(upload_id: str) -> NotFoundError:
    shown = upload_id if is_upload_id(upload_id) else "with that id"
    return NotFoundError(f"No upload {shown}.", code="upload_not_found")


def upload_complete() -> ConflictError:
    return ConflictError(
        "The upload is complete; it takes no more chunks and cannot be abandoned.",
        code="upload_complete",
    )


def upload_expired() -> GoneError:
    return GoneError(
        "The upload's file was removed because no video used it in time; upload the file again.",
        code="upload_expired",
    )


def uploads_busy() -> ConflictError:
    return ConflictError(
        "Other uploads of yours are starting right now; try again shortly.",
        code="uploads_busy",
        headers={"Retry-After": "1"},
    )


def too_many_uploads(limit: int) -> ConflictError:
    return ConflictError(
        f"You have {limit} uploads in progress, the most allowed; complete or delete one "
        "first (an upload left alone expires a day after its last chunk).",
        code="too_many_uploads",
        extra={"max_uploads_in_progress": limit},
    )


def proof_attempts_exhausted(retry_after: int) -> RateLimitedError:
    return RateLimitedError(
        f"{MAX_PROOF_FAILURES} wrong proofs were sent for this file; send its chunks and "
        "complete without a proof, or prove again after Retry-After seconds.",
        retry_after=retry_after,
        code="proof_attempts_exhausted",
    )


def tus_upload_in_progress(upload_id: str) -> ConflictError:
    return ConflictError(
        f"This upload was created with tus; continue it at /api/v1/tus/{upload_id}.",
        code="tus_upload_in_progress",
    )


def upload_completing() -> ConflictError:
    return ConflictError(
        "The upload is being assembled right now; ask for its state again shortly.",
        code="upload_completing",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


class UploadService:
    def __init__(
        self,
        *,
        db: Database,
        kv: KeyValueStore,
        blobs: BlobStore,
        max_upload_bytes: int,
        user_quota_bytes: int = 0,
        max_uploads_in_progress: int = DEFAULT_MAX_UPLOADS_IN_PROGRESS,
        state_ttl: float = DEFAULT_STATE_TTL,
        completion_lease: float = DEFAULT_COMPLETION_LEASE,
        completion_wait: float = DEFAULT_COMPLETION_WAIT,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        new_upload_id: Callable[[], str] = new_id,
        randbelow: Callable[[int], int] = secrets.randbelow,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._state = UploadStateStore(kv)
        self._records = UploadRecords(db)
        self._blob_rows = BlobRows()
        self._max_upload_bytes = max_upload_bytes
        # 0: unlimited, and the database is not read.
        self._quota = user_quota_bytes
        self._max_in_progress = max_uploads_in_progress
        self._ledger = QuotaLedger(db, kv, unused_window=timedelta(seconds=state_ttl))
        self._challenges = ChallengeStore(kv)
        self._ttl = state_ttl
        self._lease = completion_lease
        self._wait = completion_wait
        self._clock = clock
        self._new_upload_id = new_upload_id
        self._randbelow = randbelow
        # Chunk removals started by completions and not finished yet (``settled``).
        self._removals: set[asyncio.Task[None]] = set()

    # -- the five operations -----------------------------------------------------------

    async def create(
        self, owner_id: str, *, filename: str, size: int, content_hash: str, chunk_size: int
    ) -> UploadView:
        """A new upload (already validated in shape); instant when the file is stored."""
        self._check_size(size)
        stored = await self._blobs.stat(content_blob_key(content_hash))
        challenge = None
        if stored is not None and stored.size == size:
            length = min(size, CHALLENGE_BYTES)
            challenge = await self._challenges.issue(
                owner_id,
                content_hash,
                fresh=Challenge(offset=self._randbelow(size - length + 1), length=length),
                ttl=self._ttl,
            )
        upload = self.new_upload_state(
            owner_id,
            filename=filename,
            size=size,
            content_hash=content_hash,
            chunk_size=chunk_size,
            challenge=challenge,
        )
        await self.admit(upload)
        return _uploading_view(upload, received=set())

    # -- for other upload protocols (tus) over the same storage -------------------------

    @property
    def state_ttl(self) -> float:
        """Seconds an upload in progress lives without activity (its Redis TTL)."""
        return self._ttl

    def new_upload_state(
        self,
        owner_id: str,
        *,
        filename: str,
        size: int,
        content_hash: str = "",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        challenge: Challenge | None = None,
    ) -> UploadState:
        """The state of a new upload, not stored yet (``admit`` stores it). An empty
        ``content_hash`` means the client announced none: ``complete_parts`` computes it."""
        now = self._clock()
        return UploadState(
            id=self._new_upload_id(),
            owner_id=owner_id,
            filename=filename,
            size=size,
            chunk_size=chunk_size,
            content_hash=content_hash,
            state=UPLOADING,
            created_at=now,
            expires_at=now + timedelta(seconds=self._ttl),
            challenge=challenge,
        )

    async def admit(self, upload: UploadState, *, fields: Mapping[str, str] | None = None) -> None:
        """Checks ``upload`` against the size limit, the owner's uploads in progress and
        quota, and stores its state (``fields``, the native layout's by default) counted
        in the owner's ledger: 413 ``upload_too_large`` or ``quota_exceeded``, 409
        ``too_many_uploads``, with nothing stored, when it does not fit."""
        self._check_size(upload.size)
        state = encode_state(upload) if fields is None else fields
        for _ in range(RESERVE_ATTEMPTS):
            finished: str | None = None
            allowance = UNLIMITED
            if self._quota:
                # Read before the database: an upload finishing between the two reads
                # changes it, and the ledger then asks for both again.
                finished = await self._ledger.finished_count(upload.owner_id)
                # Never below 0 (a user over their quota: a lowered setting), which is
                # UNLIMITED's range.
                allowance = max(
                    0,
                    self._quota
                    - await self._ledger.stored_bytes(upload.owner_id, now=self._clock()),
                )
            reservation = await self._ledger.admit(
                upload.owner_id,
                upload.id,
                size=upload.size,
                state=state,
                allowance=allowance,
                max_in_progress=self._max_in_progress,
                ttl=self._ttl,
                finished_count=finished,
            )
            if reservation.outcome is ReserveOutcome.RESERVED:
                return
            if reservation.outcome is ReserveOutcome.TOO_MANY:
                raise too_many_uploads(self._max_in_progress)
            if reservation.outcome is ReserveOutcome.EXCEEDED:
                raise self._quota_exceeded(upload, reservation.remaining)
        raise uploads_busy()

    async def complete_parts(self, upload: UploadState, part_keys: Sequence[str]) -> UploadView:
        """Completes ``upload`` from the blobs ``part_keys``, whose bytes in that order are
        the file, with the lease, verification, dedup, record and ``upload.completed``
        event of ``complete``. Idempotent like it. The caller has checked that the parts
        add up to ``upload.size``; an empty ``upload.content_hash`` is computed here."""
        return await self._complete_when_free(
            upload.id, lambda: self._attempt_parts(upload, part_keys)
        )

    async def discard(self, upload_id: str) -> None:
        """Frees the chunks of an upload whose state another protocol deleted (failures
        are left to the sweeper); its ledger entry went with the state."""
        await self._drop_chunks(upload_id)

    def _check_size(self, size: int) -> None:
        if size > self._max_upload_bytes:
            raise PayloadTooLargeError(
                f"The file is larger than the limit of {self._max_upload_bytes} bytes.",
                code="upload_too_large",
                extra={"max_bytes": self._max_upload_bytes},
            )

    def _quota_exceeded(self, upload: UploadState, remaining: int) -> PayloadTooLargeError:
        remaining = max(0, remaining)
        return PayloadTooLargeError(
            f"The file needs {upload.size} bytes; {remaining} of your quota of "
            f"{self._quota} bytes are free. Delete videos or unfinished uploads to make room.",
            code="quota_exceeded",
            extra={
                "quota_bytes": self._quota,
                "remaining_bytes": remaining,
                "size": upload.size,
            },
        )

    async def status(self, owner_id: str, upload_id: str) -> UploadView:
        found = await self._find(owner_id, upload_id)
        if isinstance(found, UploadRecord) and found.state == UPLOAD_EXPIRED:
            return replace(_complete_view(found), state=UPLOAD_EXPIRED)
        if isinstance(found, UploadRecord) or found.complete:
            return _complete_view(found)
        return _uploading_view(found, received=await self._state.received(upload_id))

    async def put_chunk(
        self,
        owner_id: str,
        upload_id: str,
        index: int,
        *,
        checksum: str,
        content_length: int | None,
        body: AsyncIterable[bytes],
    ) -> int:
        """Stores chunk ``index`` from ``body``; returns the bytes stored (0 if a repeat)."""
        upload = await self._find(owner_id, upload_id)
        _refuse_expired(upload)
        if isinstance(upload, UploadRecord) or upload.complete:
            raise upload_complete()
        if await self._state.is_completing(upload_id):
            raise upload_completing()
        if not 0 <= index < upload.total_chunks:
            raise BadRequestError(
                f"This upload has chunks 0 to {upload.total_chunks - 1}.",
                code="chunk_index_out_of_range",
                extra={"total_chunks": upload.total_chunks},
            )
        expected = upload.chunk_length(index)
        # Refused before a byte is read when the client says up front it sends too much.
        if content_length is not None and content_length != expected:
            raise chunk_length_mismatch(expected, f"Content-Length is {content_length}")
        chunk = CheckedChunk(body, expected_length=expected, expected_sha256=checksum)
        if await self._state.is_received(upload_id, index):
            async for _ in chunk:
                pass
            return 0
        key = chunk_key(upload_id, index)
        # The blob first, then the index: an index in the set always has its bytes stored.
        await self._blobs.write(key, chunk)
        outcome = await self._state.record_chunk(
            upload_id,
            index,
            owner_id=owner_id,
            ttl=self._ttl,
            expires_at=self._expiry(),
            # Not used by completion for now (see _assemble); kept with the index so a
            # completion that can trust them (a chunk file no racing PUT can replace)
            # needs no change to the upload state.
            block_digests=chunk.block_digests(),
        )
        if outcome is ChunkOutcome.MISSING:
            # Deleted or expired while the bytes arrived: nothing would ever read them.
            await self._blobs.delete(key)
            raise upload_not_found(upload_id)
        if outcome is ChunkOutcome.COMPLETE:
            raise upload_complete()
        if outcome is ChunkOutcome.COMPLETING:
            # Not in the set the assembler works from; a retry after it gives up records it.
            raise upload_completing()
        return expected

    async def complete(self, owner_id: str, upload_id: str, *, proof: str | None) -> UploadView:
        """Assembles and verifies the file (or checks the instant-upload proof) once."""
        return await self._complete_when_free(
            upload_id, lambda: self._attempt_completion(owner_id, upload_id, proof)
        )

    async def _complete_when_free(
        self, upload_id: str, attempt: Callable[[], Awaitable[UploadView | None]]
    ) -> UploadView:
        """``attempt``'s view, attempted again while another request holds the lease."""
        deadline = time.monotonic() + self._wait
        view = await attempt()
        if view is not None:
            return view
        # Another request holds the lease: wait for its notice, then look again.
        async with self._state.notices(upload_id) as notices:
            while True:
                view = await attempt()
                if view is not None:
                    return view
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise upload_completing()
                await notices.wait(min(remaining, NOTICE_RECHECK_SECONDS))

    async def delete(self, owner_id: str, upload_id: str) -> None:
        found = await self._find(owner_id, upload_id)
        _refuse_expired(found)
        if isinstance(found, UploadRecord) or found.complete:
            raise upload_complete()
        outcome = await self._state.delete(upload_id, owner_id=owner_id)
        if outcome is DeleteOutcome.MISSING:
            raise upload_not_found(upload_id)
        if outcome is DeleteOutcome.COMPLETE:
            raise upload_complete()
        if outcome is DeleteOutcome.COMPLETING:
            raise upload_completing()
        # The state is gone first: a chunk landing now finds no upload and removes itself.
        await self._drop_chunks(upload_id)

    # -- completion ------------------------------------------------------------------

    async def _attempt_completion(
        self, owner_id: str, upload_id: str, proof: str | None
    ) -> UploadView | None:
        """The finished upload, or None while another request holds the lease."""
        found = await self._find(owner_id, upload_id)
        _refuse_expired(found)
        if isinstance(found, UploadRecord) or found.complete:
            return _complete_view(found)
        if proof is not None and not found.instant:
            raise ValidationError(
                "A proof answers an instant upload's challenge; this upload has none.",
                errors=[{"field": "proof", "problem": "not expected for this upload"}],
            )
        token = secrets.token_hex(16)
        outcome = await self._state.begin_completion(upload_id, token, lease=self._lease)
        if outcome is LeaseOutcome.BUSY:
            return None
        if outcome is not LeaseOutcome.ACQUIRED:
            # Finished or deleted between the look and the lease: the next look says which.
            found = await self._find(owner_id, upload_id)
            return _complete_view(found) if isinstance(found, UploadRecord) else None
        try:
            return await self._complete_with_lease(found, token, proof)
        finally:
            await self._state.release(upload_id, token)
            await self._state.announce(upload_id)

    async def _attempt_parts(
        self, upload: UploadState, part_keys: Sequence[str]
    ) -> UploadView | None:
        """Like ``_attempt_completion``, for an upload whose parts the caller names."""
        record = await self._records.by_id(upload.id)
        if record is not None:
            _refuse_expired(record)
            return _complete_view(record)
        token = secrets.token_hex(16)
        outcome = await self._state.begin_completion(upload.id, token, lease=self._lease)
        if outcome is LeaseOutcome.BUSY:
            return None
        if outcome is LeaseOutcome.MISSING:
            raise upload_not_found(upload.id)
        if outcome is LeaseOutcome.COMPLETE:
            record = await self._records.by_id(upload.id)
            return _complete_view(record) if record is not None else None
        try:
            return await self._complete_with_lease(upload, token, None, part_keys)
        finally:
            await self._state.release(upload.id, token)
            await self._state.announce(upload.id)

    async def _complete_with_lease(
        self,
        upload: UploadState,
        token: str,
        proof: str | None,
        part_keys: Sequence[str] | None = None,
    ) -> UploadView:
        # Recorded already when a previous holder died between the commit and Redis.
        record = await self._records.by_id(upload.id)
        if record is None:
            record = await self._store_and_record(upload, token, proof, part_keys)
        _refuse_expired(record)
        # Out of the ledger in the same step: from here the database counts it.
        await self._state.finish(
            upload.id,
            token,
            owner_id=upload.owner_id,
            completed_at=record.completed_at or self._clock(),
            ttl=self._ttl,
        )
        # The chunks go after the answer: the file is stored and recorded, and unlinking a
        # GiB of chunk files took 1-2 s on the disks measured (ext4 mounted with discard),
        # time the uploader would wait for nothing. If the process stops first, the
        # sweeper removes them once the completed state expires.
        self._drop_chunks_soon(upload.id)
        return _complete_view(record)

    async def _store_and_record(
        self,
        upload: UploadState,
        token: str,
        proof: str | None,
        part_keys: Sequence[str] | None,
    ) -> UploadRecord:
        """The file stored (or the proof checked against it) and the upload recorded.

        ``_record`` checks under the blob row's lock that the file is still stored: if
        the collector removed it after it was found stored here (a dedup completion that
        wrote nothing, an instant proof), the file is stored again from the chunks, once
        more at most; an instant upload has none and its proof check answers 409
        ``instant_unavailable``.
        """
        for _ in range(STORE_ATTEMPTS):
            if proof is not None:
                await self._check_proof(upload, proof)
            elif part_keys is not None:
                upload = await self._assemble_parts(upload, token, part_keys)
            else:
                await self._assemble(upload, token)
            try:
                return await self._record(upload, instant=proof is not None)
            except StoredFileGoneError:
                logger.info(
                    "the file of upload %s was collected while it completed; storing it again",
                    upload.id,
                )
        raise upload_completing()

    def _drop_chunks_soon(self, upload_id: str) -> None:
        task = asyncio.create_task(self._drop_chunks_logged(upload_id), name="upload-chunk-removal")
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _drop_chunks_logged(self, upload_id: str) -> None:
        try:
            await self._drop_chunks(upload_id)
        except Exception:
            # Nobody awaits this task's outcome: say what went wrong; the sweeper retries.
            logger.exception("removing the chunks of completed upload %s failed", upload_id)

    async def settled(self) -> None:
        """Returns once the chunk removals started by completions have finished (before
        the store closes at shutdown; a test that counts files)."""
        while self._removals:
            await asyncio.wait(set(self._removals))

    async def abandon_removals(self) -> None:
        """Cancels the chunk removals still running (a shutdown that waited long enough):
        the sweeper removes what they leave."""
        if self._removals:
            logger.warning("%d chunk removals cut short at shutdown", len(self._removals))
        for task in self._removals:
            task.cancel()
        await asyncio.gather(*self._removals, return_exceptions=True)

    async def _check_proof(self, upload: UploadState, proof: str) -> None:
        challenge = upload.challenge
        if challenge is None:  # excluded by the caller; kept for the type checker
            raise ValidationError("This upload has no challenge to answer.")
        attempt = await self._challenges.attempt(
            upload.owner_id,
            upload.content_hash,
            challenge,
            limit=MAX_PROOF_FAILURES,
            ttl=self._ttl,
        )
        if attempt.outcome is AttemptOutcome.REFUSED:
            raise proof_attempts_exhausted(max(1, -(-attempt.expires_in_ms // 1000)))
        try:
            matches = await self._proof_matches(upload, challenge, proof)
        except BaseException:
            await self._challenges.give_back(upload.owner_id, upload.content_hash)
            raise
        if not matches:
            raise UnprocessableError(
                "The proof is not the SHA-256 of the challenged byte range.",
                code="proof_mismatch",
            )
        await self._challenges.give_back(upload.owner_id, upload.content_hash)

    async def _proof_matches(self, upload: UploadState, challenge: Challenge, proof: str) -> bool:
        digest = hashlib.sha256()
        read = 0
        try:
            async for piece in self._blobs.read(
                content_blob_key(upload.content_hash),
                offset=challenge.offset,
                length=challenge.length,
            ):
                digest.update(piece)
                read += len(piece)
        except BlobNotFoundError:
            read = -1
        if read != challenge.length:
            # Collected since the challenge was made: the bytes must come the long way.
            raise ConflictError(
                "The stored copy of this file is gone; send the chunks and complete "
                "without a proof.",
                code="instant_unavailable",
            )
        return hmac.compare_digest(digest.hexdigest(), proof)

    async def _assemble(self, upload: UploadState, token: str) -> None:
        missing = await self._missing_chunks(upload)
        if missing:
            raise ConflictError(
                f"{len(missing)} of {upload.total_chunks} chunks are missing.",
                code="chunks_missing",
                extra={"missing": missing},
            )
        parts = [chunk_key(upload.id, index) for index in range(upload.total_chunks)]
        try:
            # Always verified from the bytes: the block digests recorded with each chunk
            # cannot stand for them while a racing PUT of the same index may replace the
            # chunk's file after another PUT recorded its digests (a client sending other
            # bytes on purpose would have them stored under the genuine content hash:
            # tests/api/test_uploads.py, racing_puts). docs/ARCHITECTURE.md, "Uploads".
            await self._write_content(upload, token, parts)
        except BlobNotFoundError:
            # A chunk vanished under us (a sweeper, an operator): forget it, ask for it.
            gone = [index for index, key in enumerate(parts) if await self._blobs.stat(key) is None]
            await self._state.forget_chunks(upload.id, gone)
            raise ConflictError(
                f"{len(gone)} chunks were lost in storage; send them again.",
                code="chunks_missing",
                extra={"missing": gone},
            ) from None

    async def _assemble_parts(
        self, upload: UploadState, token: str, part_keys: Sequence[str]
    ) -> UploadState:
        """Writes the file from ``part_keys``; returns ``upload`` with its content hash."""
        try:
            if not upload.content_hash:
                hasher = ContentHasher()
                keep_lease = self._lease_keeper(upload.id, token)
                for key in part_keys:
                    async for piece in self._blobs.read(key, chunk_size=ASSEMBLY_PIECE_BYTES):
                        await asyncio.to_thread(hasher.update, piece)
                    await keep_lease()
                upload = replace(upload, content_hash=hasher.hexdigest())
                stored = await self._blobs.stat(content_blob_key(upload.content_hash))
                if hasher.size == upload.size and stored is not None and stored.size == upload.size:
                    # Stored once already, and every byte was just hashed: nothing to write.
                    return upload
            await self._write_content(upload, token, part_keys)
        except BlobNotFoundError:
            raise ConflictError(
                "Part of this upload was lost in storage; delete it and upload the file again.",
                code="upload_data_lost",
            ) from None
        return upload

    async def _write_content(self, upload: UploadState, token: str, parts: Sequence[str]) -> None:
        """The file under its content hash from ``parts``, verified (once per hash: a
        stored copy is only checked against). ``BlobNotFoundError`` if a part is gone."""
        stream = read_ahead(
            verified_concatenation(
                self._blobs,
                parts,
                content_hash=upload.content_hash,
                size=upload.size,
                after_part=self._lease_keeper(upload.id, token),
            ),
            depth=ASSEMBLY_READ_AHEAD,
        )
        target = content_blob_key(upload.content_hash)
        stored = await self._blobs.stat(target)
        if stored is not None and stored.size == upload.size:
            # Stored once already (dedup): verify the chunks, write nothing.
            async for _ in stream:
                pass
        else:
            await self._blobs.write(target, stream)

    async def _missing_chunks(self, upload: UploadState) -> list[int]:
        received = await self._state.received(upload.id)
        return [index for index in range(upload.total_chunks) if index not in received]

    def _lease_keeper(self, upload_id: str, token: str) -> Callable[[], Awaitable[None]]:
        renewed_at = time.monotonic()

        async def keep() -> None:
            nonlocal renewed_at
            if time.monotonic() - renewed_at < self._lease / 3:
                return
            if not await self._state.renew(upload_id, token, lease=self._lease):
                # Stalled past the lease and someone took over: stop, leave it to them.
                raise upload_completing()
            renewed_at = time.monotonic()

        return keep

    async def _record(self, upload: UploadState, *, instant: bool) -> UploadRecord:
        """The blob row, the finished upload and its event, in one transaction."""
        now = self._clock()
        record = UploadRecord(
            id=upload.id,
            owner_id=upload.owner_id,
            filename=upload.filename,
            size=upload.size,
            content_hash=upload.content_hash,
            chunk_size=upload.chunk_size,
            instant=instant,
            state=COMPLETE,
            created_at=upload.created_at,
            completed_at=now,
        )
        event = Event.new(
            UPLOAD_COMPLETED,
            {
                "upload_id": upload.id,
                "owner_id": upload.owner_id,
                "content_hash": upload.content_hash,
                "size": upload.size,
                "filename": upload.filename,
            },
        )
        try:
            async with self._db.transaction() as conn:
                await self._blob_rows.keep(
                    conn, content_hash=upload.content_hash, size=upload.size, now=now
                )
                # Under the row's lock: a file stored now stays stored (BlobRows.keep).
                if not await self._is_stored(upload):
                    raise StoredFileGoneError(upload.content_hash)
                await self._records.add(conn, record)
                await add_event(conn, event)
        except DuplicateKeyError:
            existing = await self._records.by_id(upload.id)
            if existing is None:
                raise
            return existing
        return record

    async def _is_stored(self, upload: UploadState) -> bool:
        stored = await self._blobs.stat(content_blob_key(upload.content_hash))
        return stored is not None and stored.size == upload.size

    # -- helpers ---------------------------------------------------------------------

    async def _find(self, owner_id: str, upload_id: str) -> UploadState | UploadRecord:
        """The upload in progress (Redis) or finished (its durable record, the truth once
        it exists); 404 if neither, 403 if not yours."""
        if not is_upload_id(upload_id):
            raise upload_not_found(upload_id)
        found: UploadState | UploadRecord | None = await self._state.load(upload_id)
        if found is None or found.complete:
            found = await self._records.by_id(upload_id) or found
        if found is None:
            raise upload_not_found(upload_id)
        if found.owner_id != owner_id:
            raise ForbiddenError("This upload belongs to someone else.", code="upload_forbidden")
        if isinstance(found, UploadState) and not found.complete and not found.content_hash:
            # Only tus uploads announce no hash; their bytes are not chunks of this API.
            raise tus_upload_in_progress(upload_id)
        return found

    async def _drop_chunks(self, upload_id: str) -> None:
        """Deletes every chunk blob of the upload; failures are left to the sweeper."""
        try:
            keys = [key async for key in self._blobs.list(upload_prefix(upload_id))]
            for key in keys:
                await self._blobs.delete(key)
        except (OSError, BlobStoreUnavailableError) as exc:
            # The upload's state says what happened; the sweeper removes the leftovers
            # once that state expires.
            logger.warning("could not remove the chunks of upload %s: %r", upload_id, exc)

    def _expiry(self) -> datetime:
        return self._clock() + timedelta(seconds=self._ttl)


def _refuse_expired(found: UploadState | UploadRecord) -> None:
    """410 ``upload_expired`` for a finished upload whose file was collected unused."""
    if isinstance(found, UploadRecord) and found.state == UPLOAD_EXPIRED:
        raise upload_expired()


def _uploading_view(upload: UploadState, *, received: set[int]) -> UploadView:
    total = upload.total_chunks
    return UploadView(
        id=upload.id,
        state=UPLOADING,
        filename=upload.filename,
        size=upload.size,
        content_hash=upload.content_hash,
        chunk_size=upload.chunk_size,
        total_chunks=total,
        received=sorted(index for index in received if 0 <= index < total),
        missing=[index for index in range(total) if index not in received],
        instant=upload.instant,
        challenge=upload.challenge,
        expires_at=upload.expires_at,
        completed_at=None,
    )


def _complete_view(upload: UploadState | UploadRecord) -> UploadView:
    return UploadView(
        id=upload.id,
        state=COMPLETE,
        filename=upload.filename,
        size=upload.size,
        content_hash=upload.content_hash,
        chunk_size=upload.chunk_size,
        total_chunks=upload.total_chunks,
        received=list(range(upload.total_chunks)),
        missing=[],
        instant=upload.instant,
        challenge=None,
        expires_at=None,
        completed_at=upload.completed_at,
    )
