"""The content hash: a file's identity everywhere in vod (upload, dedup, the stream's ETag).

The scheme Dropbox documents as ``content_hash``: split the bytes into 4 MiB blocks,
SHA-256 each block, concatenate the raw digests, SHA-256 that; lower-case hex. Blocks let
a browser (or the server, while bytes arrive) compute it piece by piece in bounded memory.
An empty input has no blocks: its hash is the SHA-256 of nothing.

    hasher = ContentHasher()
    for piece in pieces:
        hasher.update(piece)
    hasher.hexdigest() == content_hash(b"".join(pieces))

Upload chunk sizes are multiples of ``BLOCK_SIZE``, so every chunk but the last is made of
whole blocks of the file; the hasher itself takes pieces of any size, cut anywhere.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from typing import Final

__all__ = [
    "BLOCK_SIZE",
    "SHA256_HEX_RE",
    "ChunkDigests",
    "ContentHasher",
    "content_hash",
    "content_hash_of_blocks",
]

BLOCK_SIZE: Final = 4 * 1024 * 1024
# A SHA-256 as vod writes it (the content hash, X-Chunk-SHA256, an instant-upload proof).
SHA256_HEX_RE: Final = re.compile(r"^[0-9a-f]{64}$")


def _within_blocks(data: bytes | bytearray | memoryview, filled: int) -> Iterator[memoryview]:
    """``data`` cut where it crosses a block boundary, ``filled`` bytes into a block."""
    view = memoryview(data).cast("B")
    while view:
        piece = view[: BLOCK_SIZE - filled]
        yield piece
        filled = (filled + len(piece)) % BLOCK_SIZE
        view = view[len(piece) :]


class ContentHasher:
    """Incremental content hash; ``update`` with pieces of any size, in file order."""

    __slots__ = ("_block", "_block_filled", "_blocks", "_digests", "size")

    def __init__(self) -> None:
        self._digests = hashlib.sha256()
        self._block = hashlib.sha256()
        self._block_filled = 0
        # The raw digest of every finished block (32 bytes per 4 MiB): an upload records
        # them per chunk (completion still reads the bytes back: docs/ARCHITECTURE.md).
        self._blocks: list[bytes] = []
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        for piece in _within_blocks(data, self._block_filled):
            self._block.update(piece)
            self._block_filled += len(piece)
            self.size += len(piece)
            if self._block_filled == BLOCK_SIZE:
                block = self._block.digest()
                self._blocks.append(block)
                self._digests.update(block)
                self._block = hashlib.sha256()
                self._block_filled = 0

    def hexdigest(self) -> str:
        """The hash of everything so far; the hasher may go on being updated."""
        digests = self._digests.copy()
        if self._block_filled:
            digests.update(self._block.digest())
        return digests.hexdigest()

    def block_digests(self) -> list[bytes]:
        """The raw SHA-256 of each block so far, the unfinished last one included."""
        if self._block_filled:
            return [*self._blocks, self._block.digest()]
        return list(self._blocks)


class ChunkDigests:
    """One chunk's SHA-256 (``X-Chunk-SHA256``) and the SHA-256 of each of its 4 MiB blocks,
    from one pass with the first block hashed once; ``update`` with pieces in order.

    Why once is enough: SHA-256 runs a fixed initial state through the message 64 bytes at
    a time and pads only at the end. A chunk and its first block start with the same
    ``BLOCK_SIZE`` bytes (a multiple of 64), so at the block's end the chunk's hash holds
    exactly the state the block's own hash would, and its digest then is the block's
    (hashlib's ``digest()`` finishes a copy and lets the hash go on). Every later block
    starts from the initial state and needs a hash of its own. For the default 8 MiB chunk
    that is three blocks hashed instead of four.

    The chunk must start at a block boundary of the file (upload chunks do: their size is
    a multiple of ``BLOCK_SIZE``), so its blocks are the file's.
    """

    __slots__ = ("_block", "_block_filled", "_blocks", "_chunk", "size")

    def __init__(self) -> None:
        self._chunk = hashlib.sha256()
        # None within the first block, whose hash is the chunk's own.
        self._block: hashlib._Hash | None = None
        self._block_filled = 0
        self._blocks: list[bytes] = []
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        for piece in _within_blocks(data, self._block_filled):
            self._chunk.update(piece)
            if self._block is not None:
                self._block.update(piece)
            self._block_filled += len(piece)
            self.size += len(piece)
            if self._block_filled == BLOCK_SIZE:
                self._blocks.append(self._current_block().digest())
                self._block = hashlib.sha256()
                self._block_filled = 0

    def hexdigest(self) -> str:
        """The SHA-256 of the chunk so far."""
        return self._chunk.hexdigest()

    def block_digests(self) -> list[bytes]:
        """The raw SHA-256 of each block so far, the unfinished last one included."""
        if self._block_filled:
            return [*self._blocks, self._current_block().digest()]
        return list(self._blocks)

    def _current_block(self) -> hashlib._Hash:
        return self._chunk if self._block is None else self._block


def content_hash_of_blocks(block_digests: Iterable[bytes]) -> str:
    """The content hash of a file from its blocks' raw SHA-256 digests, in file order."""
    digests = hashlib.sha256()
    for block in block_digests:
        digests.update(block)
    return digests.hexdigest()


def content_hash(data: bytes | bytearray | memoryview | Iterable[bytes]) -> str:
    """The content hash of ``data``, or of the concatenation of the pieces it yields."""
    hasher = ContentHasher()
    if isinstance(data, bytes | bytearray | memoryview):
        hasher.update(data)
    else:
        for piece in data:
            hasher.update(piece)
    return hasher.hexdigest()
