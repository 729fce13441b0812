"""The blob store contract, run against every adapter.

Only "local" exists so far. An adapter joins by adding a param to ``harness`` that builds
its store and a ``leftovers`` view of everything the adapter has stored, including what a
caller never sees (temporary files here; unfinished multipart uploads for S3), so the
atomicity tests can prove nothing was left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from shared.blobs import (
    CHUNK_SIZE,
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    BlobTooLargeError,
    InvalidBlobKeyError,
    LocalBlobStore,
    open_blob_store,
)
from shared.errors import BadRequestError, ConfigError

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
HOSTILE_KEYS = [
    "../x",
    "/etc/passwd",
    "a//b",
    "a\x00b",
    "",
    ".",
    "a/../../b",
    "a/./b",
    "a/",
    "a\\b",
    "a\nb",
    "x" * 256,
    ".tmp-0123456789abcdef",
]


@dataclass
class Harness:
    store: BlobStore
    # Every object the adapter holds, hidden or not, as sorted names.
    leftovers: Callable[[], Awaitable[list[str]]]


@pytest.fixture(params=["local"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    root = tmp_path / "blobs"
    store = open_blob_store(f"file://{root}")

    async def leftovers() -> list[str]:
        return sorted(str(path.relative_to(root)) for path in root.rglob("*") if not path.is_dir())

    yield Harness(store, leftovers)
    await store.close()


@pytest.fixture
def store(harness: Harness) -> BlobStore:
    return harness.store


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def read_all(store: BlobStore, key: str, **kwargs: int) -> bytes:
    return b"".join([piece async for piece in store.read(key, **kwargs)])


async def listed(store: BlobStore, prefix: str = "") -> list[str]:
    return [key async for key in store.list(prefix)]


def tree(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


SAMPLE = bytes(range(256)) * 4099  # a little over 1 MiB, not a multiple of any chunk size


async def test_write_read_round_trip(store: BlobStore) -> None:
    info = await store.write("blobs/ab/abcdef", chunks_of(SAMPLE))
    assert info == BlobInfo(
        key="blobs/ab/abcdef", size=len(SAMPLE), sha256=sha256(SAMPLE), modified=info.modified
    )
    assert await read_all(store, "blobs/ab/abcdef") == SAMPLE
    stat = await store.stat("blobs/ab/abcdef")
    assert stat is not None
    assert stat.size == len(SAMPLE)
    assert isinstance(stat.modified, datetime)
    assert stat.modified.tzinfo is not None


async def test_empty_blob(store: BlobStore) -> None:
    info = await store.write("empty", chunks_of(b""))
    assert (info.size, info.sha256) == (0, sha256(b""))
    assert await read_all(store, "empty") == b""


async def test_write_replaces_an_existing_blob(store: BlobStore) -> None:
    await store.write("k", chunks_of(b"old contents"))
    await store.write("k", chunks_of(b"new"))
    assert await read_all(store, "k") == b"new"


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, None),
        (1000, 5000),
        (1000, None),
        (len(SAMPLE) - 10, 100),  # runs past the end: cut there
        (len(SAMPLE), None),  # at the end: nothing
        (len(SAMPLE) + 5, 10),  # past the end: nothing
        (5, 0),
        (CHUNK_SIZE - 3, 10),  # across a piece boundary
    ],
)
async def test_ranged_reads(store: BlobStore, offset: int, length: int | None) -> None:
    await store.write("ranged", chunks_of(SAMPLE))
    kwargs = {"offset": offset} if length is None else {"offset": offset, "length": length}
    end = None if length is None else offset + length
    assert await read_all(store, "ranged", **kwargs) == SAMPLE[offset:end]


async def test_read_pieces_respect_chunk_size(store: BlobStore) -> None:
    await store.write("pieces", chunks_of(SAMPLE))
    pieces = [p async for p in store.read("pieces", offset=7, length=100_000, chunk_size=4096)]
    assert max(len(p) for p in pieces) <= 4096
    assert b"".join(pieces) == SAMPLE[7:100_007]


async def test_missing_blob(store: BlobStore) -> None:
    assert await store.stat("nope/missing") is None
    with pytest.raises(BlobNotFoundError):
        await read_all(store, "nope/missing")


async def test_a_failing_source_leaves_nothing_behind(harness: Harness) -> None:
    store = harness.store

    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * (3 * MIB)  # enough that some of it reached storage
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.write("uploads/u1/00001", failing())
    assert await store.stat("uploads/u1/00001") is None
    assert await listed(store) == []
    assert await harness.leftovers() == []


async def test_a_failing_source_keeps_the_previous_blob(harness: Harness) -> None:
    store = harness.store
    await store.write("k", chunks_of(b"intact"))

    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.write("k", failing())
    assert await read_all(store, "k") == b"intact"
    assert await harness.leftovers() == ["k"]


async def test_a_cancelled_write_leaves_nothing_behind(harness: Harness) -> None:
    store = harness.store
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"x" * (2 * MIB)
        started.set()
        await asyncio.Event().wait()  # a client that stops sending
        yield b"never"

    writing = asyncio.create_task(store.write("uploads/u9/00001", stalled()))
    await asyncio.wait_for(started.wait(), timeout=5)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    assert await store.stat("uploads/u9/00001") is None
    assert await harness.leftovers() == []


async def test_max_bytes_refuses_and_stops_reading(harness: Harness) -> None:
    store = harness.store
    pulled = 0

    async def source() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b"y" * 1000

    with pytest.raises(BlobTooLargeError):
        await store.write("too/big", source(), max_bytes=2500)
    assert pulled == 3
    assert await store.stat("too/big") is None
    assert await harness.leftovers() == []


async def test_max_bytes_allows_exactly_the_limit(store: BlobStore) -> None:
    info = await store.write("fits", chunks_of(b"z" * 2500, size=1000), max_bytes=2500)
    assert info.size == 2500


async def test_concatenate_keeps_order_and_hashes(harness: Harness) -> None:
    store = harness.store
    parts = [bytes([n]) * (MIB + n) for n in (1, 2, 3)]
    for index, part in enumerate(parts):
        await store.write(f"uploads/u1/{index:05d}", chunks_of(part))
    order = ["uploads/u1/00002", "uploads/u1/00000", "uploads/u1/00001"]
    info = await store.concatenate("blobs/cc/joined", order)
    expected = parts[2] + parts[0] + parts[1]
    assert (info.size, info.sha256) == (len(expected), sha256(expected))
    assert await read_all(store, "blobs/cc/joined") == expected
    # The parts stay until the caller deletes them.
    assert len(await listed(store, "uploads/u1/")) == 3


async def test_concatenate_with_a_missing_part_leaves_nothing(harness: Harness) -> None:
    store = harness.store
    await store.write("uploads/u2/00000", chunks_of(b"first"))
    with pytest.raises(BlobNotFoundError):
        await store.concatenate("blobs/dd/joined", ["uploads/u2/00000", "uploads/u2/00001"])
    assert await store.stat("blobs/dd/joined") is None
    assert await harness.leftovers() == ["uploads/u2/00000"]


async def test_list_by_prefix(store: BlobStore) -> None:
    keys = [
        "uploads/a/00002",
        "uploads/a/00001",
        "uploads/ab/00001",
        "uploads/a.b",
        "uploads/a-b",
        "blobs/xx/yy",
        "top",
    ]
    for key in keys:
        await store.write(key, chunks_of(b"."))
    assert await listed(store, "uploads/a/") == ["uploads/a/00001", "uploads/a/00002"]
    assert await listed(store, "uploads/a") == [
        "uploads/a-b",
        "uploads/a.b",
        "uploads/a/00001",
        "uploads/a/00002",
        "uploads/ab/00001",
    ]
    assert await listed(store) == sorted(keys)
    assert await listed(store, "t") == ["top"]
    assert await listed(store, "nothing/") == []
    assert await listed(store, "uploads/a/00001/") == []


async def test_list_refuses_hostile_prefixes(store: BlobStore) -> None:
    for prefix in ("../", "/etc/", "a//", "..", "a\x00"):
        with pytest.raises(InvalidBlobKeyError):
            await listed(store, prefix)


async def test_delete_is_idempotent(store: BlobStore) -> None:
    await store.write("uploads/u3/00000", chunks_of(b"bytes"))
    assert await store.delete("uploads/u3/00000")
    assert not await store.delete("uploads/u3/00000")
    assert await store.stat("uploads/u3/00000") is None
    assert await listed(store) == []
    # The key can be written again after its folder was tidied away.
    await store.write("uploads/u3/00000", chunks_of(b"again"))
    assert await read_all(store, "uploads/u3/00000") == b"again"


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
async def test_hostile_keys_are_refused(harness: Harness, tmp_path: Path, key: str) -> None:
    store = harness.store
    before = tree(tmp_path)
    operations: Iterable[Callable[[], Awaitable[object]]] = [
        lambda: store.write(key, chunks_of(b"pwned")),
        lambda: read_all(store, key),
        lambda: store.stat(key),
        lambda: store.delete(key),
        lambda: store.concatenate(key, ["fine"]),
        lambda: store.concatenate("fine", [key]),
    ]
    for operation in operations:
        with pytest.raises(InvalidBlobKeyError) as caught:
            await operation()
        assert isinstance(caught.value, BadRequestError)
        assert caught.value.instance_code == "invalid_blob_key"
    with pytest.raises(InvalidBlobKeyError):
        store.local_path(key)
    assert tree(tmp_path) == before
    assert await harness.leftovers() == []


async def test_local_path_holds_the_bytes(store: BlobStore) -> None:
    await store.write("blobs/ee/file", chunks_of(b"for sendfile"))
    path = store.local_path("blobs/ee/file")
    if path is None:
        pytest.skip("this adapter is not on the local disk")
    assert path.read_bytes() == b"for sendfile"


async def test_ping(store: BlobStore) -> None:
    await store.ping()


async def test_streams_64_mib_with_bounded_pieces(store: BlobStore) -> None:
    total = 64 * MIB
    piece = os.urandom(MIB)
    expected = hashlib.sha256()

    async def generate() -> AsyncIterator[bytes]:
        # Each MiB differs (its index in front) so that an out-of-order write shows.
        for index in range(total // MIB):
            block = index.to_bytes(4, "big") + piece[4:]
            expected.update(block)
            yield block

    info = await store.write("blobs/ff/large", generate())
    assert (info.size, info.sha256) == (total, expected.hexdigest())

    got = hashlib.sha256()
    size = largest = 0
    async for chunk in store.read("blobs/ff/large", chunk_size=CHUNK_SIZE):
        got.update(chunk)
        size += len(chunk)
        largest = max(largest, len(chunk))
    assert (size, got.hexdigest()) == (total, expected.hexdigest())
    assert largest <= CHUNK_SIZE


# -- the local adapter only ----------------------------------------------------------


def test_relative_file_url_is_under_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_blob_store("file://./var/blobs")
    assert isinstance(store, LocalBlobStore)
    assert store.root == tmp_path / "var" / "blobs"
    assert store.root.is_dir()


@pytest.mark.parametrize(
    "url", ["file://host/path", "file://", "s3://bucket", "http://example.com/blobs"]
)
def test_unsupported_blob_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="VOD_BLOB_URL"):
        open_blob_store(url)


async def test_a_key_cannot_run_through_an_existing_blob(tmp_path: Path) -> None:
    store = open_blob_store(f"file://{tmp_path}/blobs")
    try:
        await store.write("a/b", chunks_of(b"file"))
        with pytest.raises(InvalidBlobKeyError):
            await store.write("a/b/c", chunks_of(b"under a file"))
        with pytest.raises(InvalidBlobKeyError):
            await store.write("a", chunks_of(b"over a folder"))
        assert await read_all(store, "a/b") == b"file"
        assert sorted(p.name for p in (tmp_path / "blobs").rglob("*")) == ["a", "b"]
    finally:
        await store.close()
