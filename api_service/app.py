"""The api service's application factory. No I/O here: back ends open in cleanup_ctx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import orjson
from aiohttp import web

from api_service.handlers.videos import video_json
from api_service.keys import SESSIONS, SIGNER, USERS, VIDEOS
from api_service.repositories.refresh_tokens import RefreshTokenRepository
from api_service.repositories.users import UserRepository
from api_service.repositories.videos import VideoRepository
from api_service.routes import setup_routes
from api_service.services.passwords import PasswordHasher
from api_service.services.sessions import LoginThrottle, SessionService
from api_service.services.users import UserService
from api_service.services.videos import VideoService
from shared.auth import TokenSigner
from shared.cache import ReadThroughCache
from shared.layout import VIDEO_CACHE_PREFIX
from shared.resources import DB, KV, bus_ctx, database_ctx, kv_ctx
from shared.settings import Settings
from shared.web import SETTINGS, CleanupContext, create_base_app

SERVICE = "api"
# Dependency order: what a later context uses is opened by an earlier one.
BACKEND_CONTEXTS: tuple[CleanupContext, ...] = (database_ctx, kv_ctx, bus_ctx)


async def domain_ctx(app: web.Application) -> AsyncIterator[None]:
    """Builds the domain services over the opened back ends."""
    settings = app[SETTINGS]
    db, kv = app[DB], app[KV]
    hasher = PasswordHasher(
        time_cost=settings.argon2_time_cost, memory_kib=settings.argon2_memory_kib
    )
    users = UserRepository(db)
    videos = VideoRepository(db)
    app[USERS] = UserService(db=db, users=users, videos=videos, hasher=hasher)
    app[VIDEOS] = VideoService(
        db=db,
        videos=videos,
        users=users,
        kv=kv,
        cache=ReadThroughCache(
            kv,
            prefix=VIDEO_CACHE_PREFIX,
            encode=lambda value: orjson.dumps(value).decode(),
            decode=orjson.loads,
        ),
        to_json=video_json,
    )
    app[SESSIONS] = SessionService(
        db=db,
        users=users,
        refresh_tokens=RefreshTokenRepository(db),
        hasher=hasher,
        signer=app[SIGNER],
        kv=kv,
        throttle=LoginThrottle(
            kv,
            max_failures=settings.login_max_failures,
            window_seconds=settings.login_window_seconds,
        ),
    )
    yield


def create_app(
    settings: Settings, *, contexts: Sequence[CleanupContext] = BACKEND_CONTEXTS
) -> web.Application:
    """The api service. ``contexts`` is the test seam for the back ends.

    Raises ``ConfigError`` without a JWT private key: the api signs every access token.
    """
    app = create_base_app(SERVICE, settings)
    app[SIGNER] = TokenSigner(settings.require_private_key())
    app.cleanup_ctx.extend([*contexts, domain_ctx])
    setup_routes(app)
    return app
