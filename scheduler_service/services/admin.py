"""What an operator sees and does through ``/api/v1/admin/``: queues, timers, parked
messages, deletion records. Only users with ``users.is_admin`` (``python -m shared.db
make-admin``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from scheduler_service.consumers.base import ConsumerGroup
from scheduler_service.jobs.lease import holder_of
from scheduler_service.jobs.outbox_relay import LEASE_NAME as RELAY_LEASE_NAME
from scheduler_service.jobs.runner import JobRunner
from scheduler_service.repositories.deletions import DeletionRepository
from shared.auth import Identity
from shared.bus import MessageBus
from shared.db import Database
from shared.db.schema import outbox, users
from shared.errors import ForbiddenError, NotFoundError
from shared.kv import KeyValueStore

MAX_LIMIT = 100
RELAY_JOB = "outbox-relay"


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat()).replace("+00:00", "Z")


class AdminService:
    def __init__(
        self,
        *,
        db: Database,
        kv: KeyValueStore,
        bus: MessageBus,
        group: ConsumerGroup,
        jobs: JobRunner,
        deletions: DeletionRepository,
    ) -> None:
        self._db = db
        self._kv = kv
        self._bus = bus
        self._group = group
        self._jobs = jobs
        self._deletions = deletions

    async def require_admin(self, identity: Identity) -> None:
        """403 unless the caller is an admin now (the flag is read on every request, so
        revoking it takes effect at once, without waiting for the token to expire)."""
        async with self._db.connect() as conn:
            row = (
                await conn.execute(select(users.c.is_admin).where(users.c.id == identity.user_id))
            ).first()
        if row is None or not row.is_admin:
            raise ForbiddenError("Only administrators may do that.", code="admin_required")

    async def queues(self) -> list[dict[str, Any]]:
        """Each consumer queue's messages by state: ready, unacked (held by a consumer of
        any replica), retrying (waiting out a delay) and parked."""
        unacked = await self._group.unacked()
        items = []
        for queue in self._group.queues:
            stats = await self._bus.queue_stats(queue)
            items.append(
                {
                    "queue": queue,
                    "ready": stats.ready,
                    "unacked": unacked.get(queue, 0),
                    "retrying": stats.retrying,
                    "parked": stats.parked,
                    "consumers": stats.consumers,
                }
            )
        return items

    async def jobs(self) -> list[dict[str, Any]]:
        """The timers (last run, next run, lease holder) and the outbox relay."""
        items: list[dict[str, Any]] = []
        for status in await self._jobs.status():
            last = status.last_run
            items.append(
                {
                    "name": status.name,
                    "kind": "timer",
                    "interval_seconds": status.interval,
                    "lease_holder": status.lease_holder,
                    "last_run": None
                    if last is None
                    else {
                        "result": last.get("result"),
                        "items": int(last.get("items") or 0),
                        "error": last.get("error") or None,
                        "replica": last.get("replica"),
                        "finished_at": last.get("finished_at"),
                    },
                    # null: due now, at the next tick of whichever replica gets the lease.
                    "next_run_at": _iso(status.next_run_at),
                }
            )
        token = await self._kv.get(f"lease:{RELAY_LEASE_NAME}")
        async with self._db.connect() as conn:
            unsent = (
                await conn.execute(
                    select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
                )
            ).scalar_one()
        items.append(
            {
                "name": RELAY_JOB,
                "kind": "relay",
                "lease_holder": None if token is None else holder_of(token),
                "unsent_events": int(unsent),
            }
        )
        return items

    def _known(self, queue: str) -> None:
        if queue not in self._group.queues:
            raise NotFoundError(f"No queue {queue!r}.", code="queue_not_found")

    async def parked(self, queue: str, *, limit: int) -> list[dict[str, Any]]:
        self._known(queue)
        items = []
        for message in await self._bus.parked_messages(queue, limit=limit):
            event = message.event
            items.append(
                {
                    "id": event.id if event else None,
                    "type": event.type if event else None,
                    "routing_key": message.routing_key,
                    "attempts": message.attempts,
                    "error": message.error,
                    "parked_at": message.headers.get("x-parked-at"),
                    "data": event.data if event else None,
                }
            )
        return items

    async def requeue(self, queue: str, *, limit: int) -> int:
        self._known(queue)
        return await self._bus.requeue_parked(queue, limit=limit)

    async def deletion(self, video_id: str) -> dict[str, Any]:
        record = await self._deletions.get(video_id) if video_id.isalnum() else None
        if record is None:
            raise NotFoundError(f"No deletion of video {video_id!r}.", code="deletion_not_found")
        return {
            "video_id": record.video_id,
            "content_hash": record.content_hash,
            "state": record.state,
            "steps_done": list(record.steps_done),
            "attempts": record.attempts,
            "last_error": record.last_error,
            "requested_at": _iso(record.requested_at),
            "updated_at": _iso(record.updated_at),
            "finished_at": _iso(record.finished_at),
        }
