"""read_ahead: the pieces in order, the source's error after them, and no orphan task."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from stream_service.storage.read_ahead import read_ahead


class SourceError(Exception):
    pass


async def numbered(count: int, *, fail: bool = False) -> AsyncGenerator[bytes, None]:
    for index in range(count):
        yield str(index).encode()
    if fail:
        raise SourceError


async def test_pieces_arrive_in_order() -> None:
    assert [piece async for piece in read_ahead(numbered(10), depth=3)] == [
        str(i).encode() for i in range(10)
    ]


async def drain(pieces: AsyncIterator[bytes], into: list[bytes]) -> None:
    async for piece in pieces:
        into.append(piece)


async def test_the_sources_error_comes_after_its_pieces() -> None:
    received: list[bytes] = []
    with pytest.raises(SourceError):
        await drain(read_ahead(numbered(5, fail=True), depth=2), received)
    assert received == [b"0", b"1", b"2", b"3", b"4"]


async def test_a_consumer_that_stops_early_stops_the_source() -> None:
    finished = asyncio.Event()

    async def endless() -> AsyncGenerator[bytes, None]:
        try:
            while True:
                yield b"x"
        finally:
            finished.set()

    pieces = read_ahead(endless(), depth=2)
    assert isinstance(pieces, AsyncGenerator)
    assert await anext(pieces) == b"x"
    await pieces.aclose()
    assert finished.is_set()
