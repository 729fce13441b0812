"""What an operator sees and does through ``/api/v1/admin/``: queues, parked messages,
deletion records. Only users with ``users.is_admin`` (``python -m shared.db make-admin``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from scheduler_service.consumers.base import ConsumerGroup
from scheduler_service.parking import requeue_parked
from scheduler_service.repositories.deletions import DeletionRepository
from shared.auth import Identity
from shared.bus import MessageBus
from shared.db import Database
from shared.db.schema import users
from shared.errors import ForbiddenError, NotFoundError

MAX_LIMIT = 100


class AdminService:
    def __init__(
        self,
        db: Database,
        bus: MessageBus,
        group: ConsumerGroup,
        deletions: DeletionRepository,
    ) -> None:
        self._db = db
        self._bus = bus
        self._group = group
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
        return [
            {
                "queue": queue,
                "ready": await self._bus.queue_depth(queue),
                "parked": await self._bus.queue_depth(f"{queue}.parked"),
            }
            for queue in self._group.queues
        ]

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
        return await requeue_parked(self._bus, queue, limit=limit)

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
            "requested_at": record.requested_at.isoformat(),
            "updated_at": record.updated_at.isoformat(),
            "finished_at": record.finished_at.isoformat() if record.finished_at else None,
        }
