"""Abandoned uploads: chunks left in the blob store after their upload state expired.

An upload in progress has its state in Redis (``upload_state_key``), with a TTL that every
request refreshes; its chunks live under ``upload_prefix(id)``. When the state is gone the
upload can never complete, so its chunks are garbage. The sweeper lists ``uploads/``,
groups keys by upload id (the listing is sorted, so one upload's keys are adjacent) and
deletes the chunks of every upload without state.

Guards: an upload whose state exists is never touched, and neither is a chunk written less
than ``min_age`` ago, whatever Redis says: a writer that stores a chunk before (or while)
it creates the state, or assembles after it dropped the state, is never raced. Keys under
``uploads/`` that do not follow the layout are left alone and logged.

The owners' ledgers of uploads in progress (their quota and count) need nothing from the
sweeper: the next create of an owner drops an expired upload by the deadline the ledger
keeps beside it (``stream_service.repositories.quota``).

Races accepted: a chunk PUT that is still streaming when the state expires may find its
chunk deleted; that upload had been idle for the state's whole TTL and is dead anyway.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from shared.blobs import BlobStore
from shared.kv import KeyValueStore
from shared.layout import CHUNKS_PREFIX, upload_prefix, upload_state_key

logger = logging.getLogger(__name__)

DEFAULT_MIN_AGE = timedelta(hours=1)
STALE_WRITE_AGE = timedelta(hours=24)


class AbandonedUploadSweeper:
    """``await sweeper.run()`` deletes abandoned chunks; returns how many it deleted."""

    def __init__(
        self, blobs: BlobStore, kv: KeyValueStore, *, min_age: timedelta = DEFAULT_MIN_AGE
    ) -> None:
        self._blobs = blobs
        self._kv = kv
        self._min_age = min_age

    async def run(self) -> int:
        deleted = 0
        async for upload_id, keys in self._uploads():
            deleted += await self.sweep(upload_id, keys)
        # Writes a killed process left unfinished (S3 multipart uploads keep their parts,
        # billed, until aborted); a day is far longer than any write takes.
        aborted = await self._blobs.abort_stale_multipart_uploads(STALE_WRITE_AGE)
        if aborted:
            logger.info("sweeper: aborted %d stale multipart uploads", aborted)
        return deleted + aborted

    async def sweep(self, upload_id: str, keys: list[str]) -> int:
        """Deletes ``keys`` (chunks of ``upload_id``) if the upload is abandoned."""
        if await self._kv.exists(upload_state_key(upload_id)):
            return 0
        cutoff = datetime.now(UTC) - self._min_age
        deleted = 0
        for key in keys:
            if self._min_age > timedelta(0):
                info = await self._blobs.stat(key)
                if info is None or (info.modified is not None and info.modified > cutoff):
                    continue
            if await self._blobs.delete(key):
                deleted += 1
        if deleted:
            logger.info(
                "swept %d chunks of abandoned upload %s",
                deleted,
                upload_id,
                extra={"upload_id": upload_id},
            )
        return deleted

    async def _uploads(self) -> AsyncIterator[tuple[str, list[str]]]:
        """(upload id, its keys) for every well-formed upload folder, in listing order."""
        current: str | None = None
        keys: list[str] = []
        async for key in self._blobs.list(CHUNKS_PREFIX):
            upload_id = _upload_id_of(key)
            if upload_id is None:
                logger.warning("sweeper: %r does not follow the upload layout; left alone", key)
                continue
            if upload_id != current:
                if current is not None:
                    yield current, keys
                current, keys = upload_id, []
            keys.append(key)
        if current is not None:
            yield current, keys


def _upload_id_of(key: str) -> str | None:
    upload_id, slash, _ = key.removeprefix(CHUNKS_PREFIX).partition("/")
    if not slash:
        return None
    try:
        upload_prefix(upload_id)
    except ValueError:
        return None
    return upload_id
