"""The open-file cache of stream_service: reuse, and never a stale or leaked descriptor."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.blobs import LocalBlobStore
from stream_service.streaming.open_files import OpenBlobFiles


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def chunks(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalBlobStore]:
    blobs = LocalBlobStore(tmp_path / "blobs")
    try:
        yield blobs
    finally:
        await blobs.close()


async def read_through(files: OpenBlobFiles, key: str) -> tuple[bytes, int]:
    async with files.lease(key) as file:
        return os.pread(file.fileno(), 100, 0), file.fileno()


async def test_a_blob_is_opened_once_and_read_by_offset(store: LocalBlobStore) -> None:
    await store.write("blobs/aa/one", chunks(b"first bytes"))
    files = OpenBlobFiles(store)
    first, fd = await read_through(files, "blobs/aa/one")
    again, same_fd = await read_through(files, "blobs/aa/one")
    assert (first, again, same_fd) == (b"first bytes", b"first bytes", fd)
    assert len(files) == 1
    files.close()


async def test_a_deleted_or_replaced_blob_is_never_served_from_the_old_file(
    store: LocalBlobStore,
) -> None:
    await store.write("blobs/aa/one", chunks(b"old"))
    files = OpenBlobFiles(store)
    assert (await read_through(files, "blobs/aa/one"))[0] == b"old"
    await store.write("blobs/aa/one", chunks(b"new"))  # renamed over the old file
    assert (await read_through(files, "blobs/aa/one"))[0] == b"new"
    await store.delete("blobs/aa/one")
    with pytest.raises(FileNotFoundError):
        await read_through(files, "blobs/aa/one")
    assert len(files) == 0
    files.close()


async def test_capacity_and_idle_sweep_close_files_but_not_under_a_reader(
    store: LocalBlobStore,
) -> None:
    for name in ("a", "b", "c"):
        await store.write(f"blobs/aa/{name}", chunks(name.encode()))
    clock = Clock()
    files = OpenBlobFiles(store, capacity=2, max_idle=10, clock=clock)
    async with files.lease("blobs/aa/a") as held:
        await read_through(files, "blobs/aa/b")
        await read_through(files, "blobs/aa/c")  # over capacity: "a" is dropped...
        assert len(files) == 2
        assert os.pread(held.fileno(), 1, 0) == b"a"  # ...but closed only after this lease
    assert held.closed
    clock.now = 5
    await read_through(files, "blobs/aa/c")
    clock.now = 12
    files.sweep()  # "b" idle for 12 s, "c" for 7 s
    assert len(files) == 1
    files.close()
    assert len(files) == 0
