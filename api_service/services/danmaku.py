"""Danmaku: send (HTTP or the live channel), read a window of the timeline.

Sending, in this order:

1. the video must exist, the offset lie within it, the sender be under the rate limit;
2. the danmaku is added to Redis (readable at once);
3. ``danmaku.created`` is published on the bus and awaited until the broker confirms it
   (the scheduler persists it in batches). If the broker cannot take it, the Redis copy is
   removed again and the sender gets a 503: a danmaku is shown only once its way to the
   database is secured, so a broker outage refuses new danmaku instead of losing them;
4. it is published to every replica's viewers (``LiveHub.publish``).

A danmaku whose text matches a blocked word is *hidden*: published on the bus with
``hidden: true`` (so the database keeps it, for moderation) but never written to Redis
nor pushed, and the sender gets the usual 201, which does not teach a spammer which
word tripped the filter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from api_service.live.hub import LiveHub
from api_service.repositories.danmaku import DanmakuRepository
from api_service.schemas import NewDanmaku
from api_service.services.spam import BlockedWords, RateLimit
from api_service.services.videos import VideoService
from shared.auth import Identity
from shared.bus import Event, MessageBus
from shared.db import new_id
from shared.errors import ValidationError
from shared.events import DANMAKU_CREATED
from shared.kv import KeyValueError

logger = logging.getLogger(__name__)


class DanmakuService:
    def __init__(
        self,
        *,
        danmaku: DanmakuRepository,
        videos: VideoService,
        bus: MessageBus,
        hub: LiveHub,
        rate_limit: RateLimit,
        blocked_words: BlockedWords,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._danmaku = danmaku
        self._videos = videos
        self._bus = bus
        self._hub = hub
        self._rate_limit = rate_limit
        self._blocked = blocked_words
        self._clock = clock

    async def require_video(self, video_id: str) -> dict[str, Any]:
        """The video's public JSON; 404 ``video_not_found``."""
        return await self._videos.get(video_id)

    async def window(self, video_id: str, from_ms: int, to_ms: int) -> list[dict[str, Any]]:
        await self._videos.get(video_id)
        return (await self._danmaku.window(video_id, from_ms, to_ms)).items

    async def create(self, identity: Identity, video_id: str, new: NewDanmaku) -> dict[str, Any]:
        video = await self._videos.get(video_id)
        duration = video.get("duration_ms")
        if duration is not None and new.offset_ms > duration:
            raise ValidationError(
                "The danmaku is not valid.",
                errors=[{"field": "offset_ms", "problem": f"past the video's end ({duration})"}],
            )
        await self._rate_limit.hit(identity.user_id)
        item: dict[str, Any] = {
            "id": new_id(),
            "offset_ms": new.offset_ms,
            "content": new.content,
            "mode": new.mode,
            "color": new.color,
            "author": {"id": identity.user_id, "username": identity.username},
            "created_at": self._clock().isoformat(),
        }
        hidden = self._blocked.matches(new.content)
        event = Event.new(
            DANMAKU_CREATED,
            {
                "id": item["id"],
                "video_id": video_id,
                "author_id": identity.user_id,
                "offset_ms": new.offset_ms,
                "content": new.content,
                "mode": new.mode,
                "color": new.color,
                "created_at": item["created_at"],
                "hidden": hidden,
            },
        )
        if hidden:
            await self._bus.publish(event)
            return item
        await self._danmaku.add(video_id, item)
        try:
            await self._bus.publish(event)
        except Exception:
            await self._danmaku.remove(video_id, item)
            raise
        try:
            await self._hub.publish(video_id, live_message(item))
        except KeyValueError as exc:
            # Stored and on its way to the database: a retry would only duplicate it.
            logger.warning("danmaku %s stored but not pushed live: %s", item["id"], exc)
        return item


def live_message(item: dict[str, Any]) -> str:
    """The live channel's text for a danmaku: its public JSON with ``type``."""
    return orjson.dumps({"type": "danmaku", **item}).decode()
