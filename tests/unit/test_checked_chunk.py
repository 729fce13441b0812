"""A chunk checked on its way to storage: one pass gives its SHA-256 and its block digests,
and a bad chunk raises before its last byte is handed on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from shared.content_hash import BLOCK_SIZE, content_hash, content_hash_of_blocks
from shared.errors import BadRequestError, UnprocessableError
from stream_service.storage.verification import CheckedChunk


async def body(data: bytes, piece: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


async def drain(chunk: CheckedChunk) -> None:
    async for _ in chunk:
        pass


@pytest.mark.parametrize("size", [1, BLOCK_SIZE, 2 * BLOCK_SIZE + 12345])
async def test_one_pass_gives_the_chunk_sha256_and_its_block_digests(size: int) -> None:
    data = os.urandom(size)
    chunk = CheckedChunk(
        body(data, 100_000),
        expected_length=size,
        expected_sha256=hashlib.sha256(data).hexdigest(),
    )
    assert b"".join([piece async for piece in chunk]) == data
    assert chunk.sha256_hexdigest() == hashlib.sha256(data).hexdigest()
    blocks = [data[i : i + BLOCK_SIZE] for i in range(0, size, BLOCK_SIZE)]
    assert chunk.block_digests() == [hashlib.sha256(block).digest() for block in blocks]
    assert content_hash_of_blocks(chunk.block_digests()) == content_hash(data)


async def test_a_wrong_checksum_is_raised_before_the_last_piece() -> None:
    data = os.urandom(BLOCK_SIZE + 10)
    chunk = CheckedChunk(body(data, 65536), expected_length=len(data), expected_sha256="0" * 64)
    handed_on: list[bytes] = []

    async def consume() -> None:
        async for piece in chunk:
            handed_on.append(piece)

    with pytest.raises(UnprocessableError) as raised:
        await consume()
    assert raised.value.instance_code == "chunk_checksum_mismatch"
    assert sum(map(len, handed_on)) < len(data)
    with pytest.raises(RuntimeError):
        chunk.block_digests()


async def test_a_short_or_long_body_is_refused() -> None:
    data = os.urandom(1000)
    digest = hashlib.sha256(data).hexdigest()
    for expected in (999, 1001):
        chunk = CheckedChunk(body(data, 300), expected_length=expected, expected_sha256=digest)
        with pytest.raises(BadRequestError) as raised:
            await drain(chunk)
        assert raised.value.instance_code == "chunk_length_mismatch"


async def test_a_body_running_past_its_length_is_cut_off_while_slices_are_being_hashed() -> None:
    # Long enough that slices are hashed in a worker thread when the excess arrives.
    data = os.urandom(3 * BLOCK_SIZE)
    expected = 2 * BLOCK_SIZE + 1
    digest = hashlib.sha256(data[:expected]).hexdigest()
    chunk = CheckedChunk(body(data, 65536), expected_length=expected, expected_sha256=digest)
    handed_on: list[bytes] = []

    async def consume() -> None:
        async for piece in chunk:
            handed_on.append(piece)

    with pytest.raises(BadRequestError) as raised:
        await consume()
    assert raised.value.instance_code == "chunk_length_mismatch"
    assert sum(map(len, handed_on)) < expected
