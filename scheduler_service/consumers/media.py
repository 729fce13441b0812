"""``upload.completed`` → probe the file, make its thumbnail, mark its videos ready.

Subscribed raw: probing takes a while and must not hold a database transaction (on
SQLite that would stop every writer). The work is safe to repeat (the thumbnail is
rewritten whole, the rows set to the same values), so the message id is recorded with
the result, after it.
"""

from __future__ import annotations

from sqlalchemy import select

from scheduler_service.consumers.base import Backends, ConsumerGroup, record_processed
from scheduler_service.services.media import MediaProcessor
from shared.bus import Event, PermanentError
from shared.db import Database
from shared.db.schema import processed_messages
from shared.events import UPLOAD_COMPLETED
from shared.layout import content_blob_key

QUEUE = "media"


class UploadCompletedConsumer:
    def __init__(self, db: Database, processor: MediaProcessor) -> None:
        self._db = db
        self._processor = processor

    async def handle(self, event: Event) -> None:
        content_hash = event.data.get("content_hash")
        try:
            content_blob_key(content_hash if isinstance(content_hash, str) else "")
        except ValueError:
            raise PermanentError(
                f"upload.completed without a valid content_hash: {content_hash!r}"
            ) from None
        assert isinstance(content_hash, str)  # noqa: S101 - checked just above
        async with self._db.connect() as conn:
            done = await conn.execute(
                select(processed_messages.c.message_id).where(
                    processed_messages.c.consumer == QUEUE,
                    processed_messages.c.message_id == event.id,
                )
            )
            if done.first() is not None:
                return
        await self._processor.process(content_hash)
        async with self._db.transaction() as conn:
            await record_processed(conn, QUEUE, event.id)


def register(group: ConsumerGroup, backends: Backends) -> None:
    processor = MediaProcessor(backends.db, backends.kv, backends.blobs)
    group.register_raw(
        QUEUE, [UPLOAD_COMPLETED], UploadCompletedConsumer(backends.db, processor).handle
    )
