"""Byte streams that check what passes through them on the way to the blob store.

Both are async generators handed to ``BlobStore.write``: they raise before their last
byte is yielded when the bytes are wrong, and an atomic write that sees its source raise
leaves nothing behind. So a bad chunk or a bad file is never stored, not even briefly.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Sequence,
)

from shared.blobs import BlobStore
from shared.content_hash import BLOCK_SIZE, ChunkDigests, ContentHasher
from shared.errors import BadRequestError, UnprocessableError

# Pieces at least this large are hashed in a worker thread (hashlib lets go of the GIL),
# so the event loop keeps serving other requests while a large file is verified; smaller
# ones cost less to hash than the hop to a thread.
OFFLOAD_HASH_BYTES = 256 * 1024
# A chunk is hashed one slice of this many bytes per worker-thread job, while the next
# slice is received: the hop (tens of µs, mostly waking the thread) is small beside 2 MiB of
# SHA-256 (once or twice, 1.3 to 2.5 ms), and what is left to hash once the last byte is
# in (the chunk's answer waits for it) is at most that.
HASH_SLICE_BYTES = 2 * 1024 * 1024
# Parts are read in content-hash blocks: one thread hop per 4 MiB, and every piece is one
# whole block for the hasher.
READ_PIECE_BYTES = BLOCK_SIZE


async def _hash(update: Callable[[bytes], None], piece: bytes) -> None:
    if len(piece) >= OFFLOAD_HASH_BYTES:
        await asyncio.to_thread(update, piece)
    else:
        update(piece)


def _ignore_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def chunk_length_mismatch(expected: int, detail: str) -> BadRequestError:
    return BadRequestError(
        f"{detail}: this chunk holds exactly {expected} bytes.",
        code="chunk_length_mismatch",
        extra={"expected_length": expected},
    )


class CheckedChunk:
    """A chunk's body as it arrives, checked on the way to the blob store.

    Cut off with a 400 at the first byte past ``expected_length`` (the rest is never
    read), refused with a 400 if short or a 422 if its SHA-256 is not ``expected_sha256``,
    both raised before the last piece is yielded. One pass over the bytes computes both
    the chunk's SHA-256 and the SHA-256 of each 4 MiB content-hash block
    (``block_digests``: recorded with the chunk, though completion reads the bytes back
    rather than trust them, docs/ARCHITECTURE.md "Uploads"; the first block shares the
    chunk's hash, ``ChunkDigests``), in slices
    of ``HASH_SLICE_BYTES`` in a worker thread while the next slice arrives. The blob
    store takes the chunk's digest from ``sha256_hexdigest`` instead of hashing the bytes
    again.

    Chunks start at multiples of the chunk size, itself a multiple of ``BLOCK_SIZE``, so
    this chunk's blocks are exactly blocks of the file.
    """

    def __init__(
        self, body: AsyncIterable[bytes], *, expected_length: int, expected_sha256: str
    ) -> None:
        self._body = body
        self._expected_length = expected_length
        self._expected_sha256 = expected_sha256
        self._digests = ChunkDigests()
        self._verified = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    def sha256_hexdigest(self) -> str:
        """The chunk's SHA-256 (equal to ``expected_sha256``), once it has been read whole."""
        if not self._verified:
            raise RuntimeError("the chunk has not been read and verified yet")
        return self._digests.hexdigest()

    def block_digests(self) -> list[bytes]:
        """The raw SHA-256 of each 4 MiB block of the chunk, once it has been read whole."""
        if not self._verified:
            raise RuntimeError("the chunk has not been read and verified yet")
        return self._digests.block_digests()

    def _hash(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._digests.update(piece)

    async def _pieces(self) -> AsyncGenerator[bytes, None]:
        expected = self._expected_length
        received = 0
        # The latest piece is held back until the next arrives, so the last one is
        # yielded only after the whole chunk is verified: a bad chunk is never stored.
        held: bytes | None = None
        hashing = _SliceHashing(self._hash)
        try:
            async for piece in self._body:
                received += len(piece)
                if received > expected:
                    raise chunk_length_mismatch(expected, "The body is longer than announced")
                if held is not None:
                    yield held
                held = piece
                await hashing.add(piece)
            if received != expected:
                raise chunk_length_mismatch(expected, f"The body ended after {received} bytes")
            await hashing.finish()
        finally:
            hashing.abandon()
        if self._digests.hexdigest() != self._expected_sha256:
            raise UnprocessableError(
                "The chunk's SHA-256 is not the one in X-Chunk-SHA256; nothing was stored. "
                "Send it again.",
                code="chunk_checksum_mismatch",
            )
        self._verified = True
        if held is not None:
            yield held


class _SliceHashing:
    """Pieces hashed by ``hash_slice`` in slices of ``HASH_SLICE_BYTES``, each in a worker
    thread while the next slice arrives.

    Awaiting each slice's hash before reading on stalled the body (≈ 1.3 ms per MiB);
    now receiving and hashing overlap. One job in flight at most: the hashes see the
    slices in order, and memory stays at two slices. The pieces are kept by reference, so
    they must be immutable (``bytes``, as a request body yields them).
    """

    __slots__ = ("_hash_slice", "_job", "_slice", "_slice_bytes")

    def __init__(self, hash_slice: Callable[[list[bytes]], None]) -> None:
        self._hash_slice = hash_slice
        self._slice: list[bytes] = []
        self._slice_bytes = 0
        self._job: asyncio.Future[None] | None = None

    async def add(self, piece: bytes) -> None:
        self._slice.append(piece)
        self._slice_bytes += len(piece)
        if self._slice_bytes >= HASH_SLICE_BYTES:
            await self._wait()
            loop = asyncio.get_running_loop()
            self._job = loop.run_in_executor(None, self._hash_slice, self._slice)
            self._slice, self._slice_bytes = [], 0

    async def finish(self) -> None:
        """Returns once every piece added is hashed."""
        await self._wait()
        if self._slice_bytes >= OFFLOAD_HASH_BYTES:
            await asyncio.to_thread(self._hash_slice, self._slice)
        else:
            self._hash_slice(self._slice)
        self._slice, self._slice_bytes = [], 0

    def abandon(self) -> None:
        """For a body given up on (refused, cut off): a job still running only touches
        hashes nobody reads any more; its outcome is retrieved so asyncio reports nothing."""
        if self._job is not None and not self._job.done():
            self._job.add_done_callback(_ignore_outcome)

    async def _wait(self) -> None:
        if self._job is not None:
            await self._job
            self._job = None


async def verified_concatenation(
    blobs: BlobStore,
    part_keys: Sequence[str],
    *,
    content_hash: str,
    size: int,
    after_part: Callable[[], Awaitable[None]],
) -> AsyncGenerator[bytes, None]:
    """The parts' bytes in order, refused with a 422 at the end unless they are ``size``
    bytes whose content hash is ``content_hash``. ``after_part`` runs between parts (the
    caller renews its lease there)."""
    hasher = ContentHasher()
    for key in part_keys:
        async for piece in blobs.read(key, chunk_size=READ_PIECE_BYTES):
            await _hash(hasher.update, piece)
            yield piece
        await after_part()
    if hasher.size != size or hasher.hexdigest() != content_hash:
        raise content_hash_mismatch()


def content_hash_mismatch() -> UnprocessableError:
    return UnprocessableError(
        "The chunks do not add up to the announced content_hash; nothing was stored. "
        "Check how the hash is computed (4 MiB blocks), then delete the upload and "
        "start again.",
        code="content_hash_mismatch",
    )
