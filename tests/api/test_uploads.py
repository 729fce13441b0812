"""Uploads through the gateway, on embedded back ends: what a client (and a rival) sees.

Files are a little over one 8 MiB chunk (the smallest chunk size), so every test has a
full chunk and a short last one and the suite stays fast. What the service stored is
checked where it lives: the blob folder, the database, Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from sqlalchemy import select

from shared.blobs import BlobInfo, BlobStore
from shared.content_hash import BLOCK_SIZE, content_hash
from shared.db import Database, open_database
from shared.db.schema import blobs, outbox, uploads
from shared.events import UPLOAD_COMPLETED
from shared.kv import KeyValueStore
from shared.layout import content_blob_key, upload_received_key, upload_state_key
from shared.resources import BLOBS, KV
from stream_service.keys import UPLOADS
from stream_service.repositories.upload_state import UploadStateStore
from stream_service.services.uploads import DEFAULT_STATE_TTL, MAX_PROOF_FAILURES
from tests.clients import CHUNK, MIB, Uploader, new_upload, pieces, sha256
from tests.problems import problem
from tests.stack import Stack

# Three chunks: two full, one short.
THREE_CHUNKS = 2 * CHUNK + 1000
TWO_CHUNKS = CHUNK + 1000
ZERO_HASH = "0" * 64


@pytest.fixture
async def uploader(stack: Stack) -> Uploader:
    return Uploader(stack, await stack.new_user())


@pytest.fixture
async def rival(stack: Stack) -> Uploader:
    return Uploader(stack, await stack.new_user())


@pytest.fixture
def blob_root(stack: Stack) -> Path:
    return Path(urlsplit(stack.settings.blob_url).path)


@pytest.fixture
async def database(stack: Stack) -> AsyncIterator[Database]:
    db = await open_database(stack.settings.db_url)
    yield db
    await db.close()


def stored_files(root: Path, folder: str) -> list[Path]:
    """Every file under ``root/folder``, temporary ones included."""
    base = root / folder
    return sorted(path for path in base.rglob("*") if path.is_file()) if base.exists() else []


async def settle_uploads(stack: Stack) -> None:
    """Returns once the chunk removals completions start (after their answers) are done."""
    await stack.servers["stream"].app[UPLOADS].settled()


async def chunks_left(stack: Stack, blob_root: Path) -> list[Path]:
    """The chunk files still stored once completions' chunk removals are done."""
    await settle_uploads(stack)
    return stored_files(blob_root, "uploads")


async def every_chunk_sent(uploader: Uploader, data: bytes) -> str:
    """A new upload of ``data`` with every chunk received: its id."""
    upload_id: str = (await uploader.start(data))["upload_id"]
    for index, chunk in enumerate(pieces(data)):
        await uploader.put_ok(upload_id, index, chunk)
    return upload_id


def blob_path(root: Path, data: bytes) -> Path:
    return root / content_blob_key(content_hash(data))


async def completed_events(db: Database) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        rows = await conn.execute(
            select(outbox.c.payload).where(outbox.c.routing_key == UPLOAD_COMPLETED)
        )
        return [orjson.loads(payload)["data"] for (payload,) in rows]


async def upload_row(db: Database, upload_id: str) -> Any:
    async with db.connect() as conn:
        result = await conn.execute(select(uploads).where(uploads.c.id == upload_id))
        return result.mappings().first()


# -- the happy paths ---------------------------------------------------------------------


async def test_out_of_order_and_repeated_chunks_make_the_file(
    stack: Stack, uploader: Uploader, blob_root: Path, database: Database
) -> None:
    data = os.urandom(THREE_CHUNKS)
    first, second, last = pieces(data)

    response = await uploader.create(new_upload(data))
    assert response.status == 201
    created = await response.json()
    upload_id = created["upload_id"]
    assert created["chunk_size"] == CHUNK
    assert created["total_chunks"] == 3
    assert created["received"] == []
    assert created["expires_at"].endswith("Z") or "+00:00" in created["expires_at"]
    assert response.headers["Location"] == f"/api/v1/uploads/{upload_id}"

    await uploader.put_ok(upload_id, 2, last)
    await uploader.put_ok(upload_id, 0, first)
    await uploader.put_ok(upload_id, 0, first)  # a repeat is a no-op 204
    status = await uploader.status(upload_id)
    assert status["state"] == "uploading"
    assert (status["received"], status["missing"]) == ([0, 2], [1])
    await uploader.put_ok(upload_id, 1, second)

    response = await uploader.complete(upload_id)
    assert response.status == 200, await response.text()
    assert await response.json() | {"completed_at": None} == {
        "upload_id": upload_id,
        "state": "complete",
        "content_hash": content_hash(data),
        "size": len(data),
        "filename": "film.mp4",
        "instant": False,
        "completed_at": None,
    }
    status = await uploader.status(upload_id)
    assert (status["state"], status["missing"], status["expires_at"]) == ("complete", [], None)

    assert blob_path(blob_root, data).read_bytes() == data
    assert await chunks_left(stack, blob_root) == []  # chunks dropped
    events = await completed_events(database)
    assert events == [
        {
            "upload_id": upload_id,
            "owner_id": events[0]["owner_id"],
            "content_hash": content_hash(data),
            "size": len(data),
            "filename": "film.mp4",
        }
    ]
    row = await upload_row(database, upload_id)
    assert (row["state"], row["size"], row["content_hash"]) == (
        "complete",
        len(data),
        content_hash(data),
    )
    assert row["owner_id"] == events[0]["owner_id"]
    async with database.connect() as conn:
        blob = (
            (await conn.execute(select(blobs).where(blobs.c.content_hash == content_hash(data))))
            .mappings()
            .one()
        )
    # Nothing references it yet: the collector's grace period runs from now.
    assert (blob["size"], blob["ref_count"]) == (len(data), 0)
    assert blob["zero_since"] is not None


async def test_completion_answers_before_its_chunks_are_removed(
    stack: Stack, uploader: Uploader, blob_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Removing a GiB of chunk files takes seconds on some disks; the uploader does not
    # wait for it. Here every removal is held until the answer has arrived.
    data = os.urandom(TWO_CHUNKS)
    upload_id = await every_chunk_sent(uploader, data)
    store = stack.servers["stream"].app[BLOBS]
    delete = store.delete
    answered = asyncio.Event()

    async def delete_after_the_answer(key: str) -> bool:
        await answered.wait()
        return await delete(key)

    monkeypatch.setattr(store, "delete", delete_after_the_answer)
    try:
        async with asyncio.timeout(30):
            response = await uploader.complete(upload_id)
            assert response.status == 200, await response.text()
            assert len(stored_files(blob_root, "uploads")) == 2  # still there, held
    finally:
        answered.set()  # also when it failed: the stack's shutdown waits for removals
    assert await chunks_left(stack, blob_root) == []
    assert blob_path(blob_root, data).read_bytes() == data


async def test_a_shutdown_may_cut_chunk_removals_short(
    stack: Stack, uploader: Uploader, blob_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A blob store that hangs must not hold a stopping process: the removals still running
    # are cancelled and their chunks left to the sweeper.
    data = os.urandom(TWO_CHUNKS)
    upload_id = await every_chunk_sent(uploader, data)
    store = stack.servers["stream"].app[BLOBS]
    hung = asyncio.Event()

    async def hanging_delete(key: str) -> bool:
        hung.set()
        await asyncio.Event().wait()  # never returns
        return False

    monkeypatch.setattr(store, "delete", hanging_delete)
    service = stack.servers["stream"].app[UPLOADS]
    async with asyncio.timeout(30):
        assert (await uploader.complete(upload_id)).status == 200
        await hung.wait()
        await service.abandon_removals()
        await service.settled()  # nothing left to wait for
    assert len(stored_files(blob_root, "uploads")) == 2


async def test_racing_puts_of_one_chunk_with_other_bytes_never_store_a_wrong_file(
    stack: Stack, uploader: Uploader, blob_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hostile client sends chunk 0 twice at once, the genuine bytes and forged ones, each
    # with its own valid checksum, timed so that the forged bytes are the file stored and
    # the genuine PUT's digests are recorded last. Trusting the digests would store the
    # forged file under the genuine content hash, where every later upload of the genuine
    # film would be deduplicated onto it.
    data = os.urandom(TWO_CHUNKS)
    genuine, rest = pieces(data)
    forged = os.urandom(len(genuine))
    upload_id = (await uploader.start(data))["upload_id"]
    await uploader.put_ok(upload_id, 1, rest)
    store = stack.servers["stream"].app[BLOBS]
    write, record = store.write, UploadStateStore.record_chunk
    genuine_digests = [
        hashlib.sha256(genuine[i : i + BLOCK_SIZE]).digest() for i in (0, BLOCK_SIZE)
    ]
    genuine_writing, genuine_written, forged_recorded = (asyncio.Event() for _ in range(3))

    async def ordered_write(key: str, chunks: Any, **options: Any) -> Any:
        if not genuine_writing.is_set():  # the first PUT's write is the genuine one
            genuine_writing.set()
            info = await write(key, chunks, **options)
            genuine_written.set()
            return info
        await genuine_written.wait()
        return await write(key, chunks, **options)

    async def ordered_record(self: UploadStateStore, *args: Any, **kwargs: Any) -> Any:
        if list(kwargs.get("block_digests", ())) == genuine_digests:
            await forged_recorded.wait()
            return await record(self, *args, **kwargs)
        outcome = await record(self, *args, **kwargs)
        forged_recorded.set()
        return outcome

    monkeypatch.setattr(store, "write", ordered_write)
    monkeypatch.setattr(UploadStateStore, "record_chunk", ordered_record)
    async with asyncio.timeout(30):
        first = asyncio.create_task(uploader.put(upload_id, 0, genuine))
        await genuine_writing.wait()
        second = asyncio.create_task(uploader.put(upload_id, 0, forged))
        await asyncio.gather(first, second)
        response = await uploader.complete(upload_id)

    stored = blob_path(blob_root, data)
    if response.status == 200:
        assert stored.read_bytes() == data
    else:
        await problem(response, 422, "content_hash_mismatch")
        assert not stored.exists()


async def test_chunks_sent_in_parallel(uploader: Uploader, blob_root: Path) -> None:
    data = os.urandom(THREE_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    results = await asyncio.gather(
        *(uploader.put(upload_id, i, chunk) for i, chunk in reversed(list(enumerate(pieces(data)))))
    )
    assert [r.status for r in results] == [204, 204, 204]
    assert (await uploader.complete(upload_id)).status == 200
    assert blob_path(blob_root, data).read_bytes() == data


async def test_resume_lists_exactly_the_missing_chunks(uploader: Uploader) -> None:
    data = os.urandom(THREE_CHUNKS)
    chunks = pieces(data)
    upload_id = (await uploader.start(data))["upload_id"]
    await uploader.put_ok(upload_id, 1, chunks[1])

    status = await uploader.status(upload_id)
    assert (status["received"], status["missing"]) == ([1], [0, 2])
    body = await problem(await uploader.complete(upload_id), 409, "chunks_missing")
    assert body["missing"] == [0, 2]

    for index in status["missing"]:
        await uploader.put_ok(upload_id, index, chunks[index])
    assert (await uploader.complete(upload_id)).status == 200


async def test_complete_again_answers_the_finished_upload(
    uploader: Uploader, database: Database
) -> None:
    data = os.urandom(TWO_CHUNKS)
    completed = await uploader.upload(data)
    again = await uploader.complete(completed["upload_id"])
    assert again.status == 200
    assert (await again.json())["state"] == "complete"
    assert len(await completed_events(database)) == 1


async def test_status_outlives_the_redis_state(stack: Stack, uploader: Uploader) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.upload(data))["upload_id"]
    kv: KeyValueStore = stack.servers["stream"].app[KV]
    # What the TTL does after a day: the database still knows the finished upload.
    assert await kv.delete(upload_state_key(upload_id)) == 1

    status = await uploader.status(upload_id)
    assert status["state"] == "complete"
    assert (status["size"], status["content_hash"]) == (len(data), content_hash(data))
    assert (status["total_chunks"], status["received"], status["missing"]) == (2, [0, 1], [])


# -- chunks refused ----------------------------------------------------------------------


async def test_checksum_mismatch_stores_nothing(uploader: Uploader, blob_root: Path) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    first = pieces(data)[0]

    response = await uploader.put(upload_id, 0, first, checksum=sha256(b"something else"))
    await problem(response, 422, "chunk_checksum_mismatch")
    assert stored_files(blob_root, "uploads") == []
    assert (await uploader.status(upload_id))["received"] == []


async def chunked(data: bytes) -> AsyncIterator[bytes]:
    """A body without Content-Length (chunked transfer): only reading it finds its length."""
    for start in range(0, len(data), MIB):
        yield data[start : start + MIB]


async def test_chunks_sent_without_content_length_make_the_file(
    uploader: Uploader, blob_root: Path
) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    for index, chunk in enumerate(pieces(data)):
        response = await uploader.gateway.put(
            f"/api/v1/uploads/{upload_id}/chunks/{index}",
            data=chunked(chunk),
            headers={**uploader.auth, "X-Chunk-SHA256": sha256(chunk)},
        )
        assert response.status == 204, await response.text()
    assert (await uploader.complete(upload_id)).status == 200
    assert blob_path(blob_root, data).read_bytes() == data


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
async def test_chunk_longer_than_announced_is_cut_off(
    uploader: Uploader, blob_root: Path, announced: bool
) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    too_long = pieces(data)[0] + b"x" * MIB
    response = await uploader.gateway.put(
        f"/api/v1/uploads/{upload_id}/chunks/0",
        data=io.BytesIO(too_long) if announced else chunked(too_long),
        headers={**uploader.auth, "X-Chunk-SHA256": sha256(too_long)},
    )
    body = await problem(response, 400, "chunk_length_mismatch")
    assert body["expected_length"] == CHUNK
    assert stored_files(blob_root, "uploads") == []
    assert (await uploader.status(upload_id))["received"] == []


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
async def test_chunk_shorter_than_its_place_is_refused(
    uploader: Uploader, blob_root: Path, announced: bool
) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    short = pieces(data)[0][:-1]
    response = await uploader.gateway.put(
        f"/api/v1/uploads/{upload_id}/chunks/0",
        data=io.BytesIO(short) if announced else chunked(short),
        headers={**uploader.auth, "X-Chunk-SHA256": sha256(short)},
    )
    await problem(response, 400, "chunk_length_mismatch")
    assert stored_files(blob_root, "uploads") == []


@pytest.mark.parametrize(
    ("index", "code"),
    [
        ("2", "chunk_index_out_of_range"),
        ("999999", "chunk_index_out_of_range"),
        ("-1", "validation_failed"),
        ("abc", "validation_failed"),
        ("1.0", "validation_failed"),
        ("1e3", "validation_failed"),
        ("99999999999999999999", "validation_failed"),
        ("%C2%B2", "validation_failed"),  # "²": a digit to Unicode, not to us
    ],
)
async def test_bad_chunk_index_is_400(uploader: Uploader, index: str, code: str) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    response = await uploader.gateway.put(
        f"/api/v1/uploads/{upload_id}/chunks/{index}",
        data=b"x",
        headers={**uploader.auth, "X-Chunk-SHA256": sha256(b"x")},
    )
    await problem(response, 400, code)


@pytest.mark.parametrize("checksum", [None, "", "abc", "g" * 64, ZERO_HASH + "0", " " + "0" * 63])
async def test_missing_or_malformed_chunk_checksum_is_400(
    uploader: Uploader, checksum: str | None
) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    headers = dict(uploader.auth)
    if checksum is not None:
        headers["X-Chunk-SHA256"] = checksum
    response = await uploader.gateway.put(
        f"/api/v1/uploads/{upload_id}/chunks/1", data=io.BytesIO(pieces(data)[1]), headers=headers
    )
    body = await problem(response, 400, "validation_failed")
    assert body["errors"][0]["field"] == "X-Chunk-SHA256"


async def test_upper_case_hex_is_accepted(uploader: Uploader) -> None:
    data = os.urandom(TWO_CHUNKS)
    created = await uploader.start(data, content_hash=content_hash(data).upper())
    chunks = pieces(data)
    for index, chunk in enumerate(chunks):
        response = await uploader.put(created["upload_id"], index, chunk, sha256(chunk).upper())
        assert response.status == 204
    completed = await (await uploader.complete(created["upload_id"])).json()
    assert completed["content_hash"] == content_hash(data)


# -- who may do what ---------------------------------------------------------------------


async def test_someone_elses_upload_is_403(uploader: Uploader, rival: Uploader) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    chunk = pieces(data)[0]

    await problem(await rival.get(upload_id), 403, "upload_forbidden")
    await problem(await rival.put(upload_id, 0, chunk), 403, "upload_forbidden")
    await problem(await rival.complete(upload_id), 403, "upload_forbidden")
    await problem(await rival.delete(upload_id), 403, "upload_forbidden")
    # The rival changed nothing.
    assert (await uploader.status(upload_id))["received"] == []

    completed = await uploader.upload(data)
    await problem(await rival.get(completed["upload_id"]), 403, "upload_forbidden")


async def test_anonymous_callers_are_401(stack: Stack, uploader: Uploader) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    gateway = stack.gateway
    base = f"/api/v1/uploads/{upload_id}"
    responses = [
        await gateway.post("/api/v1/uploads", json=new_upload(data)),
        await gateway.get(base),
        await gateway.put(f"{base}/chunks/0", data=b"x", headers={"X-Chunk-SHA256": sha256(b"x")}),
        await gateway.post(f"{base}/complete"),
        await gateway.delete(base),
    ]
    for response in responses:
        await problem(response, 401, "unauthorized")


@pytest.mark.parametrize(
    "upload_id", ["01J9ZK3Q5W8X2M4N6P7R9S1T3V", "x" * 65, "a.b", "a_b", "%C3%A9"]
)
async def test_unknown_upload_is_404(uploader: Uploader, upload_id: str) -> None:
    await problem(await uploader.get(upload_id), 404, "upload_not_found")
    await problem(await uploader.put(upload_id, 0, b"x"), 404, "upload_not_found")
    await problem(await uploader.complete(upload_id), 404, "upload_not_found")
    await problem(await uploader.delete(upload_id), 404, "upload_not_found")


# -- creation refused ----------------------------------------------------------------------


async def test_file_over_the_limit_is_413(stack: Stack, uploader: Uploader) -> None:
    limit = stack.settings.max_upload_bytes
    response = await uploader.create(
        {"filename": "huge.mp4", "size": limit + 1, "content_hash": ZERO_HASH}
    )
    body = await problem(response, 413, "upload_too_large")
    assert body["max_bytes"] == limit
    response = await uploader.create(
        {"filename": "edge.mp4", "size": limit, "content_hash": ZERO_HASH}
    )
    assert response.status == 201


GOOD = {"filename": "film.mp4", "size": 10, "content_hash": ZERO_HASH}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**GOOD, "size": 0}, "size"),  # an empty file is refused: it is no video
        ({**GOOD, "size": -1}, "size"),
        ({**GOOD, "size": "10"}, "size"),
        ({**GOOD, "size": 10.0}, "size"),
        ({**GOOD, "size": True}, "size"),
        ({**GOOD, "size": None}, "size"),
        ({k: v for k, v in GOOD.items() if k != "size"}, "size"),
        ({**GOOD, "filename": ""}, "filename"),
        ({**GOOD, "filename": "  "}, "filename"),
        ({**GOOD, "filename": "a/b.mp4"}, "filename"),
        ({**GOOD, "filename": "a\\b.mp4"}, "filename"),
        ({**GOOD, "filename": "bad\x00name"}, "filename"),
        ({**GOOD, "filename": "x" * 256}, "filename"),
        ({**GOOD, "filename": 7}, "filename"),
        ({**GOOD, "content_hash": "abc"}, "content_hash"),
        ({**GOOD, "content_hash": "z" * 64}, "content_hash"),
        ({**GOOD, "content_hash": 12}, "content_hash"),
        ({**GOOD, "chunk_size": 4 * MIB}, "chunk_size"),
        ({**GOOD, "chunk_size": 8 * MIB + 1}, "chunk_size"),
        ({**GOOD, "chunk_size": 68 * MIB}, "chunk_size"),
        ({**GOOD, "chunk_size": 2**80}, "chunk_size"),
        ({**GOOD, "chunk_size": -8 * MIB}, "chunk_size"),
        ({**GOOD, "chunk_size": "8388608"}, "chunk_size"),
        ({**GOOD, "chunk_size": None}, "chunk_size"),
    ],
)
async def test_invalid_upload_is_400_naming_the_field(
    uploader: Uploader, body: dict[str, Any], field: str
) -> None:
    response = await uploader.create(body)
    problem_body = await problem(response, 400, "validation_failed")
    assert [error["field"] for error in problem_body["errors"]] == [field]


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"1", b"null"])
async def test_upload_body_that_is_not_an_object_is_400(uploader: Uploader, body: bytes) -> None:
    response = await uploader.gateway.post(
        "/api/v1/uploads",
        data=body,
        headers={**uploader.auth, "Content-Type": "application/json"},
    )
    await problem(response, 400, "validation_failed")


async def test_malformed_bodies_are_400_or_415(uploader: Uploader) -> None:
    gateway = uploader.gateway
    response = await gateway.post(
        "/api/v1/uploads",
        data=b"{not json",
        headers={**uploader.auth, "Content-Type": "application/json"},
    )
    await problem(response, 400, "malformed_json")
    response = await gateway.post(
        "/api/v1/uploads",
        data=b"filename=x",
        headers={**uploader.auth, "Content-Type": "text/plain"},
    )
    await problem(response, 415, "unsupported_media_type")


async def test_bigger_chunk_size_is_honoured(uploader: Uploader, blob_root: Path) -> None:
    data = os.urandom(TWO_CHUNKS)
    created = await uploader.start(data, chunk_size=12 * MIB)
    assert (created["chunk_size"], created["total_chunks"]) == (12 * MIB, 1)
    await uploader.put_ok(created["upload_id"], 0, data)
    assert (await uploader.complete(created["upload_id"])).status == 200
    assert blob_path(blob_root, data).read_bytes() == data


# -- completion --------------------------------------------------------------------------


async def test_content_hash_mismatch_leaves_nothing_behind(
    uploader: Uploader, blob_root: Path, database: Database
) -> None:
    data = os.urandom(TWO_CHUNKS)
    claimed = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data, content_hash=content_hash(claimed)))["upload_id"]
    for index, chunk in enumerate(pieces(data)):
        await uploader.put_ok(upload_id, index, chunk)

    await problem(await uploader.complete(upload_id), 422, "content_hash_mismatch")
    assert stored_files(blob_root, "blobs") == []
    assert await completed_events(database) == []
    assert await upload_row(database, upload_id) is None
    status = await uploader.status(upload_id)
    assert (status["state"], status["missing"]) == ("uploading", [])


class Gate:
    """Holds the first read of an upload's chunk 0 (or the first concatenation of the
    chunks, which completion uses when their block digests are recorded) until opened,
    and says when it waits. ``install`` puts it in place of the store's methods."""

    def __init__(self, store: BlobStore, upload_id: str) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()
        self._store = store
        self._read = store.read
        self._concatenate = store.concatenate
        self._key = f"uploads/{upload_id}/000000"

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(self._store, "read", self.read)
        monkeypatch.setattr(self._store, "concatenate", self.concatenate)

    def read(self, key: str, **options: Any) -> AsyncIterator[bytes]:
        return self._gated(key, **options)

    async def concatenate(self, target_key: str, part_keys: Sequence[str]) -> BlobInfo:
        if self._key in part_keys and not self.reached.is_set():
            self.reached.set()
            await self.opened.wait()
        return await self._concatenate(target_key, part_keys)

    async def _gated(self, key: str, **options: Any) -> AsyncIterator[bytes]:
        if key == self._key and not self.reached.is_set():
            self.reached.set()
            await self.opened.wait()
        async for piece in self._read(key, **options):
            yield piece


def announce_subscriptions(kv: KeyValueStore, subscribed: asyncio.Event) -> Callable[..., Any]:
    """``kv.subscribe`` that sets ``subscribed`` once the subscription is confirmed."""
    original = kv.subscribe

    @asynccontextmanager
    async def subscribe(channel: str) -> AsyncIterator[AsyncIterator[str]]:
        async with original(channel) as messages:
            subscribed.set()
            yield messages

    return subscribe


async def test_concurrent_completes_one_assembles_the_other_sees_it_complete(
    stack: Stack,
    uploader: Uploader,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(TWO_CHUNKS)
    chunks = pieces(data)
    upload_id = (await uploader.start(data))["upload_id"]
    for index, chunk in enumerate(chunks):
        await uploader.put_ok(upload_id, index, chunk)
    stream_app = stack.servers["stream"].app
    gate = Gate(stream_app[BLOBS], upload_id)
    gate.install(monkeypatch)
    second_waits = asyncio.Event()
    monkeypatch.setattr(
        stream_app[KV], "subscribe", announce_subscriptions(stream_app[KV], second_waits)
    )

    async with asyncio.timeout(30):
        first = asyncio.create_task(uploader.complete(upload_id))
        await gate.reached.wait()  # the first holds the lease, mid-assembly
        second = asyncio.create_task(uploader.complete(upload_id))
        await second_waits.wait()  # the second found it busy and waits for word
        # Meanwhile the upload takes no chunk and cannot be abandoned.
        await problem(await uploader.put(upload_id, 0, chunks[0]), 409, "upload_completing")
        await problem(await uploader.delete(upload_id), 409, "upload_completing")
        gate.opened.set()
        responses = await asyncio.gather(first, second)

    bodies = [await response.json() for response in responses]
    assert [response.status for response in responses] == [200, 200]
    assert [body["state"] for body in bodies] == ["complete", "complete"]
    assert [event["upload_id"] for event in await completed_events(database)] == [upload_id]


async def test_instant_upload_proves_possession(
    uploader: Uploader, rival: Uploader, database: Database, blob_root: Path
) -> None:
    data = os.urandom(THREE_CHUNKS)
    await uploader.upload(data)
    stored = blob_path(blob_root, data).stat()

    response = await rival.create(new_upload(data))
    assert response.status == 200, await response.text()
    instant = await response.json()
    assert instant["instant"] is True
    offset, length = instant["challenge"]["offset"], instant["challenge"]["length"]
    assert 0 <= offset <= len(data) - length
    assert length == min(len(data), MIB)
    upload_id = instant["upload_id"]
    status = await rival.status(upload_id)
    assert status["challenge"] == instant["challenge"]

    await problem(await rival.complete(upload_id), 409, "chunks_missing")
    wrong = sha256(data[offset + 1 : offset + length + 1])
    await problem(await rival.complete(upload_id, {"proof": wrong}), 422, "proof_mismatch")
    await problem(await rival.complete(upload_id, {"proof": "nope"}), 400, "validation_failed")
    assert (await rival.status(upload_id))["state"] == "uploading"

    right = sha256(data[offset : offset + length])
    response = await rival.complete(upload_id, {"proof": right})
    assert response.status == 200, await response.text()
    completed = await response.json()
    assert (completed["state"], completed["instant"]) == ("complete", True)
    assert completed["content_hash"] == content_hash(data)

    row = await upload_row(database, upload_id)
    assert row["instant"]
    assert len(await completed_events(database)) == 2
    # The file was not touched.
    after = blob_path(blob_root, data).stat()
    assert (after.st_ino, after.st_mtime_ns) == (stored.st_ino, stored.st_mtime_ns)


async def test_the_challenge_stays_the_same_for_one_user_and_content(
    uploader: Uploader, rival: Uploader
) -> None:
    """Creating uploads again (deleting the last ones or not) never draws another range:
    a rival who knows part of the file cannot draw until the range falls there."""
    data = os.urandom(THREE_CHUNKS)
    await uploader.upload(data)

    async def challenge() -> tuple[str, dict[str, int]]:
        response = await rival.create(new_upload(data))
        assert response.status == 200, await response.text()
        created = await response.json()
        return created["upload_id"], created["challenge"]

    first_id, first = await challenge()
    _, second = await challenge()
    assert (await rival.delete(first_id)).status == 204
    third_id, third = await challenge()
    assert first == second == third
    assert (await rival.status(third_id))["challenge"] == first


async def test_wrong_proofs_are_limited_per_user_and_content(
    uploader: Uploader, rival: Uploader
) -> None:
    data = os.urandom(TWO_CHUNKS)
    await uploader.upload(data)
    ids = [(await (await rival.create(new_upload(data))).json())["upload_id"] for _ in range(3)]
    challenge = (await rival.status(ids[0]))["challenge"]
    offset, length = challenge["offset"], challenge["length"]
    right = {"proof": sha256(data[offset : offset + length])}
    wrong = {"proof": ZERO_HASH}

    # Spread over two uploads of the same content: the count is the user's, not the upload's.
    for attempt in range(MAX_PROOF_FAILURES - 1):
        await problem(await rival.complete(ids[attempt % 2], wrong), 422, "proof_mismatch")
    # A right proof does not count.
    assert (await rival.complete(ids[0], right)).status == 200
    await problem(await rival.complete(ids[1], wrong), 422, "proof_mismatch")

    refused = await rival.complete(ids[1], right)
    body = await problem(refused, 429, "proof_attempts_exhausted")
    assert 0 < int(refused.headers["Retry-After"]) <= DEFAULT_STATE_TTL
    assert "chunks" in body["detail"]
    # A new upload of the content starts from the same count; its chunks still finish it.
    later = (await (await rival.create(new_upload(data))).json())["upload_id"]
    await problem(await rival.complete(later, right), 429, "proof_attempts_exhausted")
    for index, chunk in enumerate(pieces(data)):
        await rival.put_ok(later, index, chunk)
    assert (await rival.complete(later)).status == 200
    # Another user is not held back by the rival's guesses.
    mine = (await (await uploader.create(new_upload(data))).json())["upload_id"]
    own = (await uploader.status(mine))["challenge"]
    proof = {"proof": sha256(data[own["offset"] : own["offset"] + own["length"]])}
    assert (await uploader.complete(mine, proof)).status == 200


async def test_proof_for_a_normal_upload_is_400(uploader: Uploader) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    response = await uploader.complete(upload_id, {"proof": ZERO_HASH})
    await problem(response, 400, "validation_failed")


async def test_known_hash_with_another_size_is_a_normal_upload(
    uploader: Uploader, rival: Uploader
) -> None:
    data = os.urandom(TWO_CHUNKS)
    await uploader.upload(data)
    response = await rival.create(new_upload(data, size=len(data) + 1))
    assert response.status == 201
    assert "challenge" not in await response.json()


async def test_instant_upload_may_send_its_chunks_instead(
    uploader: Uploader, rival: Uploader
) -> None:
    data = os.urandom(TWO_CHUNKS)
    await uploader.upload(data)
    upload_id = (await (await rival.create(new_upload(data))).json())["upload_id"]
    for index, chunk in enumerate(pieces(data)):
        await rival.put_ok(upload_id, index, chunk)
    response = await rival.complete(upload_id)
    assert response.status == 200
    assert (await response.json())["instant"] is False


async def test_two_users_same_bytes_one_stored_file(
    stack: Stack, uploader: Uploader, rival: Uploader, blob_root: Path, database: Database
) -> None:
    data = os.urandom(TWO_CHUNKS)
    # Both start before either finishes, so both send every byte.
    mine = (await uploader.start(data))["upload_id"]
    theirs = (await rival.start(data))["upload_id"]
    for index, chunk in enumerate(pieces(data)):
        await uploader.put_ok(mine, index, chunk)
        await rival.put_ok(theirs, index, chunk)

    assert (await uploader.complete(mine)).status == 200
    first = blob_path(blob_root, data).stat()
    assert (await rival.complete(theirs)).status == 200
    second = blob_path(blob_root, data).stat()

    assert stored_files(blob_root, "blobs") == [blob_path(blob_root, data)]
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert await chunks_left(stack, blob_root) == []
    async with database.connect() as conn:
        rows = (await conn.execute(select(blobs.c.content_hash, blobs.c.ref_count))).all()
    assert [tuple(row) for row in rows] == [(content_hash(data), 0)]
    assert {event["upload_id"] for event in await completed_events(database)} == {mine, theirs}


# -- abandoning ----------------------------------------------------------------------------


async def test_delete_drops_chunks_and_state(
    stack: Stack, uploader: Uploader, blob_root: Path
) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.start(data))["upload_id"]
    await uploader.put_ok(upload_id, 0, pieces(data)[0])
    assert stored_files(blob_root, "uploads") != []

    response = await uploader.delete(upload_id)
    assert response.status == 204
    assert stored_files(blob_root, "uploads") == []
    kv: KeyValueStore = stack.servers["stream"].app[KV]
    assert not await kv.exists(upload_state_key(upload_id))
    assert not await kv.exists(upload_received_key(upload_id))
    await problem(await uploader.get(upload_id), 404, "upload_not_found")
    await problem(await uploader.delete(upload_id), 404, "upload_not_found")
    await problem(await uploader.put(upload_id, 1, pieces(data)[1]), 404, "upload_not_found")


async def test_complete_upload_takes_no_chunks_and_cannot_be_deleted(
    uploader: Uploader,
) -> None:
    data = os.urandom(TWO_CHUNKS)
    upload_id = (await uploader.upload(data))["upload_id"]
    await problem(await uploader.put(upload_id, 0, pieces(data)[0]), 409, "upload_complete")
    await problem(await uploader.delete(upload_id), 409, "upload_complete")
