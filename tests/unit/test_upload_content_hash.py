"""The content hash (Dropbox's scheme) against a plain reading of its definition."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from shared.content_hash import (
    BLOCK_SIZE,
    ChunkDigests,
    ContentHasher,
    content_hash,
    content_hash_of_blocks,
)


def by_definition(data: bytes) -> str:
    """SHA-256 of the concatenated SHA-256 digests of the 4 MiB blocks."""
    blocks = [data[i : i + BLOCK_SIZE] for i in range(0, len(data), BLOCK_SIZE)]
    return hashlib.sha256(b"".join(hashlib.sha256(block).digest() for block in blocks)).hexdigest()


def test_empty_input_is_the_sha256_of_nothing() -> None:
    assert content_hash(b"") == hashlib.sha256(b"").hexdigest()
    assert ContentHasher().hexdigest() == hashlib.sha256(b"").hexdigest()


def test_a_small_file_is_one_block() -> None:
    assert content_hash(b"abc") == hashlib.sha256(hashlib.sha256(b"abc").digest()).hexdigest()
    # Not the plain SHA-256: a client that sends that gets content_hash_mismatch.
    assert content_hash(b"abc") != hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize(
    "size", [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE + 7]
)
def test_block_boundaries(size: int) -> None:
    data = os.urandom(size)
    assert content_hash(data) == by_definition(data)


def test_pieces_cut_anywhere_give_the_same_hash() -> None:
    data = os.urandom(2 * BLOCK_SIZE + 12345)
    cuts = sorted(random.Random(4).sample(range(1, len(data)), 40))
    hasher = ContentHasher()
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        hasher.update(memoryview(data)[start:end])
    assert hasher.hexdigest() == by_definition(data)
    assert hasher.size == len(data)
    assert content_hash(iter([data[:5], data[5:]])) == by_definition(data)


def test_hexdigest_midway_does_not_disturb_the_hasher() -> None:
    data = os.urandom(BLOCK_SIZE + 10)
    hasher = ContentHasher()
    hasher.update(data[:100])
    assert hasher.hexdigest() == by_definition(data[:100])
    hasher.update(data[100:])
    assert hasher.hexdigest() == by_definition(data)


@pytest.mark.parametrize(
    "size",
    [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE + 7],
)
def test_a_chunks_digests_are_its_sha256_and_its_blocks_sha256(size: int) -> None:
    # The first block shares the chunk's hash (ChunkDigests): compared with hashing each
    # block, and the chunk, separately from scratch, cut into pieces across boundaries.
    data = os.urandom(size)
    cuts = sorted(random.Random(size).sample(range(1, size), min(size - 1, 12))) if size else []
    digests = ChunkDigests()
    for start, end in zip([0, *cuts], [*cuts, size], strict=True):
        digests.update(memoryview(data)[start:end])
    blocks = [data[i : i + BLOCK_SIZE] for i in range(0, size, BLOCK_SIZE)]
    assert digests.hexdigest() == hashlib.sha256(data).hexdigest()
    assert digests.block_digests() == [hashlib.sha256(block).digest() for block in blocks]
    assert content_hash_of_blocks(digests.block_digests()) == by_definition(data)
    assert digests.size == size


def test_chunk_digests_can_be_read_midway() -> None:
    data = os.urandom(BLOCK_SIZE + 10)
    digests = ChunkDigests()
    digests.update(data[:100])
    assert digests.block_digests() == [hashlib.sha256(data[:100]).digest()]
    assert digests.hexdigest() == hashlib.sha256(data[:100]).hexdigest()
    digests.update(data[100:])
    assert digests.hexdigest() == hashlib.sha256(data).hexdigest()
    assert digests.block_digests() == [
        hashlib.sha256(data[:BLOCK_SIZE]).digest(),
        hashlib.sha256(data[BLOCK_SIZE:]).digest(),
    ]
