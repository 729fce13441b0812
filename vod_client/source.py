"""What is uploaded: a file on disk (read piece by piece) or bytes in memory, and its
digests, computed in one pass without ever holding the whole file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from shared.content_hash import BLOCK_SIZE, ChunkDigests, content_hash_of_blocks

# One content-hash block per read: every read feeds the block hasher exactly one block.
READ_BYTES: Final = BLOCK_SIZE


class Source(Protocol):
    """Bytes to upload. ``read`` may block (call it in a thread) and is safe to call from
    several threads at once."""

    @property
    def size(self) -> int: ...

    @property
    def name(self) -> str: ...

    def read(self, offset: int, length: int) -> bytes: ...


class FileSource:
    """A file, read with ``pread`` so parallel senders need no shared position."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self.name = path.name

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(f"{self.path} became shorter while it was being uploaded")
        return data

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class BytesSource:
    def __init__(self, data: bytes, name: str = "upload.bin") -> None:
        self._data = data
        self.size = len(data)
        self.name = name

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]


@dataclass(frozen=True, slots=True)
class Digests:
    """The content hash (the file's identity) and each chunk's SHA-256 (X-Chunk-SHA256)."""

    content_hash: str
    chunk_size: int
    chunk_sha256: tuple[str, ...]

    @property
    def total_chunks(self) -> int:
        return len(self.chunk_sha256)


def compute_digests(source: Source, chunk_size: int) -> Digests:
    """Reads ``source`` once, block by block (blocking: run it in a thread)."""
    if chunk_size % BLOCK_SIZE:
        raise ValueError(f"the chunk size must be a multiple of {BLOCK_SIZE}")
    blocks: list[bytes] = []
    checksums = []
    for start in range(0, source.size, chunk_size):
        chunk = ChunkDigests()
        end = min(start + chunk_size, source.size)
        for offset in range(start, end, READ_BYTES):
            chunk.update(source.read(offset, min(READ_BYTES, end - offset)))
        checksums.append(chunk.hexdigest())
        blocks += chunk.block_digests()
    return Digests(content_hash_of_blocks(blocks), chunk_size, tuple(checksums))
