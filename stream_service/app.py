"""The stream service's application factory. No I/O here: back ends open in cleanup_ctx.

Chunk bodies are streamed to the blob store as they arrive and never read whole, so the
app's ``client_max_size`` (the JSON limit) does not bound them; each chunk is bounded by
its own expected length instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from aiohttp import web
from prometheus_client import Counter

from shared.cache import CacheInvalidations
from shared.resources import BLOBS, DB, KV, blobs_ctx, bus_ctx, database_ctx, kv_ctx
from shared.settings import Settings
from shared.web import METRICS, SETTINGS, CleanupContext, create_base_app
from stream_service.keys import (
    CATALOG,
    LIMITER,
    OPEN_FILES,
    STREAM_METRICS,
    UPLOADED_BYTES,
    UPLOADS,
)
from stream_service.routes import setup_routes
from stream_service.services.uploads import UploadService
from stream_service.streaming.catalog import VideoCatalog
from stream_service.streaming.limiter import StreamLimiter
from stream_service.streaming.metrics import StreamMetrics
from stream_service.streaming.open_files import (
    DEFAULT_MAX_IDLE,
    OpenBlobFiles,
    sweep_periodically,
)
from stream_service.tus.handlers import stamp_tus_resumable
from stream_service.tus.keys import TUS
from stream_service.tus.service import TusService

SERVICE = "stream"
# How long shutdown waits for completed uploads' chunk removals (a blob store that hangs
# must not hold the process); what is left, the sweeper removes.
CHUNK_REMOVAL_GRACE_SECONDS = 10.0
# Dependency order: what a later context uses is opened by an earlier one.
BACKEND_CONTEXTS: tuple[CleanupContext, ...] = (database_ctx, kv_ctx, bus_ctx, blobs_ctx)


async def domain_ctx(app: web.Application) -> AsyncIterator[None]:
    """Builds the domain services over the opened back ends."""
    app[UPLOADS] = UploadService(
        db=app[DB],
        kv=app[KV],
        blobs=app[BLOBS],
        max_upload_bytes=app[SETTINGS].max_upload_bytes,
        user_quota_bytes=app[SETTINGS].user_quota_bytes,
        max_uploads_in_progress=app[SETTINGS].max_uploads_in_progress,
    )
    invalidations = CacheInvalidations(app[KV])
    app[CATALOG] = VideoCatalog(
        db=app[DB], blobs=app[BLOBS], kv=app[KV], invalidations=invalidations
    )
    app[TUS] = TusService(uploads=app[UPLOADS], kv=app[KV], blobs=app[BLOBS])
    try:
        async with invalidations.running():
            yield
    finally:
        # PATCH bodies still being stored for clients that left, chunks of completed
        # uploads still being removed: both use the blob store, which closes next.
        await app[TUS].close()
        try:
            async with asyncio.timeout(CHUNK_REMOVAL_GRACE_SECONDS):
                await app[UPLOADS].settled()
        except TimeoutError:
            await app[UPLOADS].abandon_removals()


async def open_files_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open files of local blobs kept between range requests, swept while the app runs."""
    files = OpenBlobFiles(app[BLOBS])
    app[OPEN_FILES] = files
    sweeper = asyncio.create_task(sweep_periodically(files, DEFAULT_MAX_IDLE / 2))
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        files.close()


def create_app(
    settings: Settings, *, contexts: Sequence[CleanupContext] = BACKEND_CONTEXTS
) -> web.Application:
    """The stream service. contexts is the test seam: pass fakes to avoid real back ends."""
    app = create_base_app(SERVICE, settings)
    app[UPLOADED_BYTES] = Counter(
        "vod_uploaded_bytes_total",
        "Upload chunk bytes stored",
        ["service"],
        registry=app[METRICS].registry,
    ).labels(SERVICE)
    metrics = StreamMetrics(app[METRICS].registry)
    limiter = StreamLimiter(
        capacity=settings.stream_max_connections,
        per_client=settings.stream_max_per_client,
        on_refused=metrics.refused.inc,
    )
    metrics.active.set_function(lambda: limiter.active)
    app[STREAM_METRICS] = metrics
    app[LIMITER] = limiter
    app.cleanup_ctx.extend([*contexts, domain_ctx, open_files_ctx])
    app.on_response_prepare.append(stamp_tus_resumable)
    setup_routes(app)
    return app
