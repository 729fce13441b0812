"""``danmaku.created`` -> rows in ``danmaku``, many messages to one multi-row insert.

The api has already made each danmaku readable in Redis; this writes the durable copy.
Deliveries are gathered into a batch that is written when it holds ``batch_size``
messages or ``max_wait`` seconds after its first one, whichever comes first. Each
message's handler waits for its batch: the whole batch commits (and every message is
acked) or none does (and every message is retried by the bus).

A batch costs the same few statements whatever its size, in one transaction: one
``SELECT .. IN`` and one multi-row ``INSERT`` for the message ids
(``record_processed_batch``), one ``SELECT .. IN`` for the videos still alive, one
multi-row ``INSERT`` of the danmaku.

Exactly once: the batch's transaction records each message id in ``processed_messages``
and inserts only the danmaku of ids recorded for the first time, so a redelivered message
whose batch committed is acked without a second row. Danmaku of a video that is deleted
(or gone) are dropped: the deletion runner may already have cleared its rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import select

from scheduler_service.consumers.base import (
    Backends,
    ConsumerGroup,
    check_message_id,
    record_processed_batch,
)
from shared.bus import Event, PermanentError
from shared.db import Database, DuplicateKeyError
from shared.db.schema import danmaku, videos
from shared.events import DANMAKU_CREATED

logger = logging.getLogger(__name__)

QUEUE: Final = "danmaku-persistence"
# A batch costs a few statements whatever its size: at 5,000 messages/s one of 500
# gathers in 0.1 s, and 10 transactions/s are little for the database.
BATCH_SIZE: Final = 500
MAX_WAIT: Final = 0.25
# Room for four batches unacked: up to three committing (a batch of 500 took 50-110 ms on
# a loaded 2-core machine) while the next gathers, so the broker's window rarely closes.
PREFETCH: Final = BATCH_SIZE * 4
# How many of the latest batch sizes ``batches_written`` keeps.
_SIZES_KEPT: Final = 1000
_MODES: Final = frozenset({"scroll", "top", "bottom"})
_CONTENT_MAX: Final = 100


@dataclass(frozen=True, slots=True)
class _Pending:
    event_id: str
    row: dict[str, Any]
    done: asyncio.Future[None]


def danmaku_row(event: Event) -> dict[str, Any]:
    """The row of a ``danmaku.created`` payload; ``PermanentError`` for one that breaks a rule."""
    data = event.data
    try:
        row = {
            "id": str(data["id"]),
            "video_id": str(data["video_id"]),
            "author_id": str(data["author_id"]),
            "offset_ms": data["offset_ms"],
            "content": data["content"],
            "mode": data["mode"],
            "color": data["color"],
            "hidden": bool(data.get("hidden", False)),
            "created_at": datetime.fromisoformat(data["created_at"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentError(f"not a danmaku.created payload: {exc!r}") from None
    valid = (
        isinstance(row["offset_ms"], int)
        and row["offset_ms"] >= 0
        and isinstance(row["content"], str)
        and 0 < len(row["content"]) <= _CONTENT_MAX
        and row["mode"] in _MODES
        and isinstance(row["color"], str)
        and len(row["color"]) == len("#rrggbb")
        and row["created_at"].utcoffset() is not None
        and all(len(row[k]) <= len("0" * 26) for k in ("id", "video_id", "author_id"))
    )
    if not valid:
        raise PermanentError("a danmaku.created payload breaks the danmaku rules")
    return row


class DanmakuBatcher:
    def __init__(
        self,
        db: Database,
        *,
        consumer: str = QUEUE,
        batch_size: int = BATCH_SIZE,
        max_wait: float = MAX_WAIT,
    ) -> None:
        self._db = db
        self._consumer = consumer
        self._batch_size = batch_size
        self._max_wait = max_wait
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()
        # Rows inserted per batch, the latest ones: for metrics and tests.
        self.batches_written: deque[int] = deque(maxlen=_SIZES_KEPT)

    async def handle(self, event: Event) -> None:
        # Checked before it joins a batch: in the batch it would fail every message.
        check_message_id(event.id)
        row = danmaku_row(event)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(event.id, row, done))
        if len(self._pending) >= self._batch_size:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_wait, self._flush)
        # A handler cancelled at shutdown cancels only its own future: the batch's write is
        # a task of its own and goes on. (No asyncio.shield: it cost this path ~12 µs a
        # message, 5 % of the consumer's CPU, for no added safety.)
        await done

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = asyncio.create_task(self._write(batch), name="scheduler:danmaku-batch")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            written = await self._insert(batch)
        except Exception as exc:  # noqa: BLE001 - every message of the batch is retried
            logger.warning("danmaku: a batch of %d failed: %r", len(batch), exc)
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(exc)
                    pending.done.exception()  # retrieved: a cancelled waiter is no leak
            return
        # Committed: only now may the messages be acked.
        self.batches_written.append(written)
        for pending in batch:
            if not pending.done.done():
                pending.done.set_result(None)

    async def _insert(self, batch: list[_Pending]) -> int:
        """Write ``batch`` in one transaction; the number of danmaku rows inserted."""
        try:
            return await self._insert_once(batch)
        except DuplicateKeyError:
            # A message id of this batch was recorded by another transaction (a batch of
            # another replica holding a redelivered copy) after this one looked: all of
            # this batch rolled back; run it again, it now finds that id recorded.
            logger.info("danmaku: a batch of %d met a concurrent record; again", len(batch))
            return await self._insert_once(batch)

    async def _insert_once(self, batch: list[_Pending]) -> int:
        async with self._db.transaction() as conn:
            fresh = await record_processed_batch(
                conn, self._consumer, [pending.event_id for pending in batch]
            )
            # One row per danmaku id: a message twice in the batch is one danmaku.
            rows = list({p.row["id"]: p.row for p in batch if p.event_id in fresh}.values())
            if rows:
                video_ids = {row["video_id"] for row in rows}
                alive = set(
                    (
                        await conn.execute(
                            select(videos.c.id).where(
                                videos.c.id.in_(video_ids), videos.c.deleted_at.is_(None)
                            )
                        )
                    ).scalars()
                )
                rows = [row for row in rows if row["video_id"] in alive]
            if rows:
                # executemany: the MySQL driver sends it as one multi-row INSERT.
                await conn.execute(danmaku.insert(), rows)
        return len(rows)


def register(group: ConsumerGroup, backends: Backends) -> None:
    batcher = DanmakuBatcher(backends.db)
    group.register_raw(QUEUE, [DANMAKU_CREATED], batcher.handle, prefetch=PREFETCH)
