"""The api service's application factory. No I/O here: back ends open in cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from aiohttp import web

from api_service.handlers.videos import video_json
from api_service.keys import (
    COMMENTS,
    DANMAKU,
    LIVE_HUB,
    READ_PINS,
    REVOCATIONS,
    SESSIONS,
    SIGNER,
    TOKEN_WATCH,
    USERS,
    VIDEOS,
)
from api_service.live.hub import LiveHub
from api_service.live.token_watch import TokenWatch
from api_service.read_routing import ReadYourWrites, read_routing_middleware
from api_service.repositories.comments import CommentRepository
from api_service.repositories.danmaku import DanmakuRepository
from api_service.repositories.refresh_tokens import RefreshTokenRepository
from api_service.repositories.token_revocations import TokenRevocationRepository
from api_service.repositories.users import UserRepository
from api_service.repositories.videos import VideoRepository
from api_service.routes import setup_routes
from api_service.services.comments import CommentService
from api_service.services.danmaku import DanmakuService
from api_service.services.passwords import PasswordHasher
from api_service.services.revocations import Revocations
from api_service.services.sessions import LoginThrottle, SessionService
from api_service.services.spam import BlockedWords, RateLimit
from api_service.services.users import UserService
from api_service.services.videos import VideoService
from shared.auth import TokenSigner
from shared.cache import CacheInvalidations, ReadThroughCache
from shared.layout import VIDEO_CACHE_PREFIX
from shared.resources import BUS, DB, KV, bus_ctx, database_ctx, kv_ctx
from shared.settings import Settings
from shared.web import SETTINGS, CleanupContext, create_base_app

logger = logging.getLogger(__name__)

SERVICE = "api"
# How long start-up waits for the live hub's first subscription (Redis may be down: the
# service still starts, and the hub keeps trying).
LIVE_SUBSCRIBE_WAIT = 5.0
# Dependency order: what a later context uses is opened by an earlier one.
BACKEND_CONTEXTS: tuple[CleanupContext, ...] = (database_ctx, kv_ctx, bus_ctx)


async def domain_ctx(app: web.Application) -> AsyncIterator[None]:
    """Builds the domain services over the opened back ends."""
    settings = app[SETTINGS]
    db, kv = app[DB], app[KV]
    app[READ_PINS] = ReadYourWrites(kv, seconds=settings.db_read_your_writes_seconds)
    hasher = PasswordHasher(
        time_cost=settings.argon2_time_cost,
        memory_kib=settings.argon2_memory_kib,
        concurrency=settings.password_hash_concurrency,
    )
    users = UserRepository(db)
    videos = VideoRepository(db)
    signup_count, signup_seconds = settings.signup_rate
    app[USERS] = UserService(
        db=db,
        users=users,
        videos=videos,
        hasher=hasher,
        signup_limit=RateLimit(kv, action="signups", count=signup_count, seconds=signup_seconds),
    )
    # Drops this process's local copies of cached entries that changed anywhere.
    invalidations = CacheInvalidations(kv)
    # One cache object: comments change a video's comment_count and drop its entry too.
    video_cache: ReadThroughCache[dict[str, Any]] = ReadThroughCache(
        kv,
        prefix=VIDEO_CACHE_PREFIX,
        encode=lambda value: orjson.dumps(value).decode(),
        decode=orjson.loads,
        invalidations=invalidations,
    )
    app[VIDEOS] = VideoService(
        db=db,
        videos=videos,
        users=users,
        kv=kv,
        cache=video_cache,
        to_json=video_json,
        invalidations=invalidations,
    )
    blocked_words = BlockedWords(settings.blocked_words)
    comment_count, comment_seconds = settings.comment_rate
    app[COMMENTS] = CommentService(
        db=db,
        comments=CommentRepository(db),
        videos=app[VIDEOS],
        video_cache=video_cache,
        rate_limit=RateLimit(kv, action="comments", count=comment_count, seconds=comment_seconds),
        blocked_words=blocked_words,
    )
    app[LIVE_HUB] = LiveHub(kv, viewer_interval=settings.live_viewer_interval)
    danmaku_count, danmaku_seconds = settings.danmaku_rate
    app[DANMAKU] = DanmakuService(
        danmaku=DanmakuRepository(db, kv),
        videos=app[VIDEOS],
        bus=app[BUS],
        hub=app[LIVE_HUB],
        rate_limit=RateLimit(kv, action="danmaku", count=danmaku_count, seconds=danmaku_seconds),
        blocked_words=blocked_words,
    )
    app[REVOCATIONS] = Revocations(kv=kv, repository=TokenRevocationRepository(db))
    # A Redis restart drops the subscription: its return is the first sign to restore.
    app[TOKEN_WATCH] = TokenWatch(kv, on_subscribed=app[REVOCATIONS].try_restore)
    app[SESSIONS] = SessionService(
        db=db,
        users=users,
        refresh_tokens=RefreshTokenRepository(db),
        hasher=hasher,
        signer=app[SIGNER],
        kv=kv,
        revocations=app[REVOCATIONS],
        throttle=LoginThrottle(
            kv,
            max_failures=settings.login_max_failures,
            window_seconds=settings.login_window_seconds,
        ),
    )
    try:
        async with invalidations.running():
            yield
    finally:
        hasher.close()


async def revocations_ctx(app: web.Application) -> AsyncIterator[None]:
    """Restores the revocations into an empty key-value store before the first request,
    then keeps checking (a flush or a restart of Redis empties it)."""
    revocations = app[REVOCATIONS]
    await revocations.try_restore()
    # Sockets opened while the store was empty are looked at again after a restore.
    task = asyncio.create_task(
        revocations.keep_restored(app[TOKEN_WATCH].check_all), name="revocations:restore"
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def live_ctx(app: web.Application) -> AsyncIterator[None]:
    """Runs the live hub (fan-out subscription, viewer counts) and the token watch
    (sockets end with their token) while the app runs."""
    hub, watch = app[LIVE_HUB], app[TOKEN_WATCH]
    hub.start()
    watch.start()
    try:
        async with asyncio.timeout(LIVE_SUBSCRIBE_WAIT):
            await asyncio.gather(hub.listening.wait(), watch.listening.wait())
    except TimeoutError:
        logger.warning("live: no fan-out subscription yet; live danmaku wait for Redis")
    try:
        yield
    finally:
        await watch.close()
        await hub.close()


async def close_live_sockets(app: web.Application) -> None:
    """On shutdown: close every live socket with 1001 so viewers reconnect elsewhere."""
    if LIVE_HUB in app:
        await app[LIVE_HUB].close_sockets()


def create_app(
    settings: Settings, *, contexts: Sequence[CleanupContext] = BACKEND_CONTEXTS
) -> web.Application:
    """The api service. ``contexts`` is the test seam for the back ends.

    Raises ``ConfigError`` without a JWT private key: the api signs every access token.
    """
    app = create_base_app(SERVICE, settings)
    app[SIGNER] = TokenSigner(
        settings.require_private_key(), lifetime=settings.access_token_seconds
    )
    if settings.db_read_url is not None:
        # Reads that may go to the replica, and when a writer's must not (read_routing.py).
        app.middlewares.append(read_routing_middleware(READ_PINS))
    app.cleanup_ctx.extend([*contexts, domain_ctx, revocations_ctx, live_ctx])
    app.on_shutdown.append(close_live_sockets)
    setup_routes(app)
    return app
