"""The blob store contract, run against every adapter.

Adapters: "local" (files under a temporary folder) and "s3" (moto's standalone S3
server, started once per run in a process of its own on a free port of 127.0.0.1, with
one bucket for the run, emptied and deleted at the end; each test has a key prefix of its
own in it). ``VOD_TEST_S3=http://KEY:SECRET@host:port`` points the run at a real
S3-compatible server (MinIO, say) instead of moto.

An adapter joins by adding a param to ``harness`` that builds its store and a
``leftovers`` view of everything the adapter has stored, including what a caller never
sees (temporary files; unfinished multipart uploads), so the atomicity tests can prove
nothing was left behind. Tests of one adapter's own behaviour close the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import socket
import threading
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest
from aiobotocore.session import AioSession

from shared.blobs import (
    CHUNK_SIZE,
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    BlobStoreUnavailableError,
    BlobTooLargeError,
    InvalidBlobKeyError,
    LocalBlobStore,
    S3BlobStore,
    open_blob_store,
)
from shared.blobs import local as local_blobs
from shared.errors import BadRequestError, ConfigError
from tests.s3_server import S3Server, empty_prefix, object_keys, unfinished_uploads

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

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
    # Most bytes a 64 MiB write and read may hold at once: a few of the adapter's pieces.
    memory_bound: int


@dataclass
class S3Place:
    """One test's prefix in the run's bucket, the stores opened on it, and a plain client."""

    server: S3Server
    admin: S3Client
    prefix: str = field(default_factory=lambda: f"t-{secrets.token_hex(6)}")
    exits: AsyncExitStack = field(default_factory=AsyncExitStack)

    def open(self, **options: Any) -> S3BlobStore:
        """A store on this prefix, from the URL, or built with ``options`` when given."""
        if options:
            options.setdefault("endpoint_url", self.server.endpoint)
            options.setdefault("credentials", self.server.credentials)
            store = S3BlobStore(self.server.bucket, prefix=self.prefix + "/", **options)
        else:
            opened = open_blob_store(self.server.url(self.prefix))
            assert isinstance(opened, S3BlobStore)
            store = opened
        self.exits.push_async_callback(store.close)
        return store

    async def leftovers(self) -> list[str]:
        """Objects under the prefix, and ``multipart:<key>`` for each unfinished upload."""
        start = len(self.prefix) + 1
        objects = await object_keys(self.admin, self.server.bucket, self.prefix + "/")
        uploads = await unfinished_uploads(self.admin, self.server.bucket, self.prefix + "/")
        return sorted(
            [key[start:] for key in objects] + [f"multipart:{key[start:]}" for key, _ in uploads]
        )


@asynccontextmanager
async def s3_place_on(server: S3Server) -> AsyncIterator[S3Place]:
    """A fresh prefix on ``server``; its stores closed and its objects removed at the end."""
    async with server.admin() as admin:
        place = S3Place(server, admin)
        async with place.exits:
            yield place
        await empty_prefix(admin, server.bucket, place.prefix + "/")


@pytest.fixture
async def s3_place(s3_server: S3Server) -> AsyncIterator[S3Place]:
    async with s3_place_on(s3_server) as place:
        yield place


@pytest.fixture(params=["local", "s3"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "s3":
        async with s3_place_on(request.getfixturevalue("s3_server")) as place:
            # Two parts and change: the part being joined, its pieces, the next piece.
            yield Harness(place.open(), place.leftovers, memory_bound=24 * MIB)
        return
    root = tmp_path / "blobs"
    store = open_blob_store(f"file://{root}")

    async def leftovers() -> list[str]:
        return sorted(str(path.relative_to(root)) for path in root.rglob("*") if not path.is_dir())

    yield Harness(store, leftovers, memory_bound=8 * MIB)
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


async def test_concatenate_keeps_order(harness: Harness) -> None:
    store = harness.store
    parts = [bytes([n]) * (MIB + n) for n in (1, 2, 3)]
    for index, part in enumerate(parts):
        await store.write(f"uploads/u1/{index:05d}", chunks_of(part))
    order = ["uploads/u1/00002", "uploads/u1/00000", "uploads/u1/00001"]
    info = await store.concatenate("blobs/cc/joined", order)
    expected = parts[2] + parts[0] + parts[1]
    # No sha256: the port's contract (the parts were checked as they arrived).
    assert (info.key, info.size, info.sha256) == ("blobs/cc/joined", len(expected), None)
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


async def test_abort_stale_multipart_uploads_spares_finished_blobs(harness: Harness) -> None:
    store = harness.store
    await store.write("blobs/ab/done", chunks_of(b"finished"))
    assert await store.abort_stale_multipart_uploads(timedelta(0)) == 0
    assert await read_all(store, "blobs/ab/done") == b"finished"
    assert await harness.leftovers() == ["blobs/ab/done"]


async def test_streams_64_mib_in_bounded_pieces_and_memory(harness: Harness) -> None:
    store = harness.store
    total = 64 * MIB
    piece = os.urandom(MIB)
    expected = hashlib.sha256()

    async def generate() -> AsyncIterator[bytes]:
        # Each MiB differs (its index in front) so that an out-of-order write shows.
        for index in range(total // MIB):
            block = index.to_bytes(4, "big") + piece[4:]
            expected.update(block)
            yield block

    got = hashlib.sha256()
    size = largest = 0
    # Python allocations of this process (the S3 server runs in another): a store that
    # held the blob whole, or buffered the whole download, would pass 64 MiB. The store
    # is used once first, so that opening its client (S3's service model) is not counted.
    await store.ping()
    tracemalloc.start()
    try:
        info = await store.write("blobs/ff/large", generate())
        async for chunk in store.read("blobs/ff/large", chunk_size=CHUNK_SIZE):
            got.update(chunk)
            size += len(chunk)
            largest = max(largest, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.size, info.sha256) == (total, expected.hexdigest())
    assert (size, got.hexdigest()) == (total, expected.hexdigest())
    assert largest <= CHUNK_SIZE
    assert peak < harness.memory_bound, f"peak {peak / MIB:.1f} MiB"


# -- the local adapter only ----------------------------------------------------------


def test_relative_file_url_is_under_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_blob_store("file://./var/blobs")
    assert isinstance(store, LocalBlobStore)
    assert store.root == tmp_path / "var" / "blobs"
    assert store.root.is_dir()


@pytest.mark.parametrize("url", ["file://host/path", "file://", "http://example.com/blobs"])
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


# -- the S3 adapter only -------------------------------------------------------------


def counting_session() -> tuple[AioSession, Counter[str]]:
    """A session that counts the S3 operations of the clients made from it, by name."""
    session = AioSession()
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    session.register("before-call.s3", count)
    return session, calls


async def test_s3_url_names_bucket_prefix_endpoint_region_and_credentials() -> None:
    store = open_blob_store(
        "s3://AKIA1:se%2Fcr%40et@media-bucket/prod/v1/?endpoint=https://minio:9000&region=eu-west-3"
    )
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.endpoint_url, store.region) == (
        "media-bucket",
        "prod/v1/",
        "https://minio:9000",
        "eu-west-3",
    )
    assert store.local_path("blobs/ab/c") is None
    assert "se/cr@et" not in repr(store)
    assert "AKIA1" not in repr(store)
    plain = open_blob_store("s3://media-bucket")
    assert isinstance(plain, S3BlobStore)
    assert (plain.prefix, plain.endpoint_url, plain.region) == ("", None, "us-east-1")
    await store.close()
    await plain.close()


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3://Upper_Case",
        "s3://ab",
        "s3://bucket?endpoint=ftp://host",
        "s3://bucket?endpoint=",
        "s3://bucket?regoin=us-east-1",
        "s3://bucket?region=a&region=b",
        "s3://only-a-key@bucket",
        "s3://key:@bucket",
        "s3://bucket/../up",
        "s3://bucket/.hidden",
    ],
)
def test_bad_s3_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="VOD_BLOB_URL") as caught:
        open_blob_store(url)
    assert "only-a-key" not in str(caught.value)


async def test_small_bodies_are_one_put_large_ones_multipart(s3_place: S3Place) -> None:
    session, calls = counting_session()
    store = s3_place.open(session=session, part_size=5 * MIB)
    whole_part = os.urandom(5 * MIB)
    await store.write("one/put", chunks_of(whole_part, size=MIB))
    assert calls["PutObject"] == 1
    assert calls["CreateMultipartUpload"] == 0

    longer = whole_part + b"tail"
    info = await store.write("two/parts", chunks_of(longer, size=MIB))
    assert (calls["CreateMultipartUpload"], calls["UploadPart"]) == (1, 2)
    assert calls["CompleteMultipartUpload"] == 1
    assert (info.size, info.sha256) == (len(longer), sha256(longer))
    assert await read_all(store, "two/parts", offset=5 * MIB - 2) == longer[-6:]
    assert await s3_place.leftovers() == ["one/put", "two/parts"]


async def test_a_multipart_write_that_fails_is_aborted(s3_place: S3Place) -> None:
    session, calls = counting_session()
    store = s3_place.open(session=session, part_size=5 * MIB)

    async def failing() -> AsyncIterator[bytes]:
        for _ in range(12):  # two parts sent, a third being gathered
            yield b"f" * MIB
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.write("uploads/u7/00001", failing())
    assert (calls["UploadPart"], calls["AbortMultipartUpload"]) == (2, 1)
    assert await s3_place.leftovers() == []


async def test_max_bytes_past_the_first_part_aborts_the_upload(s3_place: S3Place) -> None:
    session, calls = counting_session()
    store = s3_place.open(session=session, part_size=5 * MIB)
    with pytest.raises(BlobTooLargeError):
        await store.write("too/big", chunks_of(b"m" * (9 * MIB), size=MIB), max_bytes=7 * MIB)
    assert (calls["UploadPart"], calls["AbortMultipartUpload"]) == (1, 1)
    assert await s3_place.leftovers() == []


async def test_a_cancelled_multipart_write_is_aborted(s3_place: S3Place) -> None:
    session, calls = counting_session()
    store = s3_place.open(session=session, part_size=5 * MIB)
    stalled = asyncio.Event()

    async def stalling() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield b"c" * MIB
        stalled.set()
        await asyncio.Event().wait()  # a client that stops sending after a part went out
        yield b"never"

    writing = asyncio.create_task(store.write("uploads/u8/00001", stalling()))
    async with asyncio.timeout(10):  # a bound on a hang, not a wait for time to pass
        await stalled.wait()
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    assert calls["AbortMultipartUpload"] == 1
    assert await s3_place.leftovers() == []


async def test_concatenate_copies_large_parts_on_the_server(s3_place: S3Place) -> None:
    session, calls = counting_session()
    store = s3_place.open(session=session, copy_concurrency=2)
    parts = [os.urandom(5 * MIB), os.urandom(5 * MIB + 7), b"the short last part"]
    for index, part in enumerate(parts):
        await store.write(f"uploads/u9/{index:05d}", chunks_of(part, size=MIB))
    calls.clear()
    info = await store.concatenate("blobs/99/joined", [f"uploads/u9/{i:05d}" for i in range(3)])
    joined = b"".join(parts)
    assert (info.size, info.sha256) == (len(joined), None)
    assert calls["UploadPartCopy"] == 3
    assert calls["UploadPart"] == calls["PutObject"] == 0  # no byte was sent back up
    assert calls["GetObject"] == 0  # nor read back to hash
    assert await read_all(store, "blobs/99/joined") == joined
    assert await s3_place.leftovers() == [
        "blobs/99/joined",
        "uploads/u9/00000",
        "uploads/u9/00001",
        "uploads/u9/00002",
    ]


async def test_concatenate_streams_when_a_middle_part_is_small(s3_place: S3Place) -> None:
    session, calls = counting_session()
    store = s3_place.open(session=session)
    parts = [os.urandom(5 * MIB), b"too small to be a middle part", os.urandom(5 * MIB)]
    for index, part in enumerate(parts):
        await store.write(f"uploads/ua/{index:05d}", chunks_of(part, size=MIB))
    calls.clear()
    info = await store.concatenate("blobs/aa/joined", [f"uploads/ua/{i:05d}" for i in range(3)])
    assert calls["UploadPartCopy"] == 0
    assert (info.size, info.sha256) == (sum(map(len, parts)), None)
    assert await read_all(store, "blobs/aa/joined") == b"".join(parts)


async def test_abort_stale_multipart_uploads_by_age(s3_place: S3Place) -> None:
    admin, bucket = s3_place.admin, s3_place.server.bucket
    mine = await admin.create_multipart_upload(Bucket=bucket, Key=f"{s3_place.prefix}/uploads/x")
    # Another deployment's upload in the same bucket, outside this store's prefix.
    theirs = await admin.create_multipart_upload(Bucket=bucket, Key=f"{s3_place.prefix}-other/y")
    try:
        listed = await admin.list_multipart_uploads(Bucket=bucket, Prefix=s3_place.prefix)
        initiated = {u["UploadId"]: u["Initiated"] for u in listed.get("Uploads", [])}
        started = initiated[mine["UploadId"]]  # the server's clock, whatever it says
        now = started + timedelta(minutes=30)
        store = s3_place.open(clock=lambda: now)

        assert await store.abort_stale_multipart_uploads(timedelta(hours=1)) == 0
        assert await s3_place.leftovers() == ["multipart:uploads/x"]

        now = started + timedelta(hours=2)
        assert await store.abort_stale_multipart_uploads(timedelta(hours=1)) == 1
        assert await s3_place.leftovers() == []
        remaining = await admin.list_multipart_uploads(Bucket=bucket, Prefix=s3_place.prefix)
        assert [u["UploadId"] for u in remaining.get("Uploads", [])] == [theirs["UploadId"]]
    finally:
        await admin.abort_multipart_upload(
            Bucket=bucket, Key=theirs["Key"], UploadId=theirs["UploadId"]
        )


@pytest.fixture
def refusing_endpoint() -> Iterator[str]:
    """An endpoint whose port is bound but not listening: connections are refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


async def test_an_unreachable_store_is_unavailable(
    s3_place: S3Place, refusing_endpoint: str
) -> None:
    store = s3_place.open(endpoint_url=refusing_endpoint, max_attempts=1)
    operations: list[Callable[[], Awaitable[object]]] = [
        store.ping,
        lambda: store.stat("k"),
        lambda: read_all(store, "k"),
        lambda: store.write("k", chunks_of(b"data")),
        lambda: store.delete("k"),
        lambda: listed(store),
        lambda: store.concatenate("k", ["a", "b"]),
        lambda: store.abort_stale_multipart_uploads(timedelta(days=1)),
    ]
    for operation in operations:
        with pytest.raises(BlobStoreUnavailableError) as caught:
            await operation()
        assert caught.value.status == 503
        assert refusing_endpoint not in caught.value.detail  # where the store lives is private


async def test_a_missing_bucket_is_unavailable(s3_server: S3Server) -> None:
    store = S3BlobStore(
        "no-such-bucket-here",
        endpoint_url=s3_server.endpoint,
        credentials=s3_server.credentials,
        max_attempts=1,
    )
    try:
        with pytest.raises(BlobStoreUnavailableError):
            await store.ping()
        with pytest.raises(BlobStoreUnavailableError):
            await store.write("k", chunks_of(b"data"))
    finally:
        await store.close()


async def test_credentials_from_the_environment(
    s3_place: S3Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_place.server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_place.server.secret_key)
    url = s3_place.server.url(s3_place.prefix, credentials=False)
    store = open_blob_store(url)
    try:
        await store.write("env/creds", chunks_of(b"signed with the environment's keys"))
        assert await read_all(store, "env/creds") == b"signed with the environment's keys"
    finally:
        await store.close()


async def test_a_closed_store_refuses_work(s3_place: S3Place) -> None:
    store = s3_place.open()
    await store.ping()
    await store.close()
    with pytest.raises(BlobStoreUnavailableError):
        await store.stat("k")


async def test_a_read_cancelled_while_its_file_opens_leaves_it_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A viewer hanging up (or a shutdown) while the local disk opens the blob: the file
    the thread then opens is closed, not left for the garbage collector."""
    store = open_blob_store(f"file://{tmp_path}")
    await store.write("blobs/ab/film", chunks_of(b"frames"))
    opened: list[IO[bytes]] = []
    may_open = threading.Event()

    def slow_open(path: Path, offset: int) -> IO[bytes]:
        may_open.wait(timeout=10)
        file = original(path, offset)
        opened.append(file)
        return file

    original = local_blobs._open_for_reading
    monkeypatch.setattr(local_blobs, "_open_for_reading", slow_open)

    async def read() -> bytes:
        return b"".join([piece async for piece in store.read("blobs/ab/film")])

    reading = asyncio.create_task(read())
    await asyncio.sleep(0)  # the read is now waiting for its thread
    reading.cancel()
    may_open.set()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert len(opened) == 1
    assert opened[0].closed
    await store.close()
