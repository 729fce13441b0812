"""Byte streams that check what passes through them on the way to the blob store.

Both are async generators handed to ``BlobStore.write``: they raise before their last
byte is yielded when the bytes are wrong, and an atomic write that sees its source raise
leaves nothing behind. So a bad chunk or a bad file is never stored, not even briefly.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Sequence

from shared.blobs import BlobStore
from shared.content_hash import BLOCK_SIZE, ContentHasher
from shared.errors import BadRequestError, UnprocessableError

# Pieces at least this large are hashed in a worker thread (hashlib lets go of the GIL),
# so the event loop keeps serving other requests while a large file is verified; smaller
# ones cost less to hash than the hop to a thread.
OFFLOAD_HASH_BYTES = 256 * 1024
# Parts are read in content-hash blocks: one thread hop per 4 MiB, and every piece is one
# whole block for the hasher.
READ_PIECE_BYTES = BLOCK_SIZE


async def _hash(update: Callable[[bytes], None], piece: bytes) -> None:
    if len(piece) >= OFFLOAD_HASH_BYTES:
        await asyncio.to_thread(update, piece)
    else:
        update(piece)


def chunk_length_mismatch(expected: int, detail: str) -> BadRequestError:
    return BadRequestError(
        f"{detail}: this chunk holds exactly {expected} bytes.",
        code="chunk_length_mismatch",
        extra={"expected_length": expected},
    )


async def checked_chunk(
    body: AsyncIterable[bytes], *, expected_length: int, expected_sha256: str
) -> AsyncGenerator[bytes, None]:
    """``body`` as it arrives, cut off with a 400 at the first byte past ``expected_length``
    (the rest is never read), and refused with a 400 if short or a 422 if its SHA-256 is
    not ``expected_sha256``."""
    digest = hashlib.sha256()
    received = 0
    async for piece in body:
        received += len(piece)
        if received > expected_length:
            raise chunk_length_mismatch(expected_length, "The body is longer than announced")
        await _hash(digest.update, piece)
        yield piece
    if received != expected_length:
        raise chunk_length_mismatch(expected_length, f"The body ended after {received} bytes")
    if digest.hexdigest() != expected_sha256:
        raise UnprocessableError(
            "The chunk's SHA-256 is not the one in X-Chunk-SHA256; nothing was stored. "
            "Send it again.",
            code="chunk_checksum_mismatch",
        )


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
        raise UnprocessableError(
            "The chunks do not add up to the announced content_hash; nothing was stored. "
            "Check how the hash is computed (4 MiB blocks), then delete the upload and "
            "start again.",
            code="content_hash_mismatch",
        )
