"""The scheduler service's application factory. No I/O here: back ends open in cleanup_ctx."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from shared.resources import blobs_ctx, bus_ctx, database_ctx, kv_ctx
from shared.settings import Settings
from shared.web import CleanupContext, create_base_app

SERVICE = "scheduler"
# Dependency order: what a later context uses is opened by an earlier one.
BACKEND_CONTEXTS: tuple[CleanupContext, ...] = (database_ctx, kv_ctx, bus_ctx, blobs_ctx)


def create_app(
    settings: Settings, *, contexts: Sequence[CleanupContext] = BACKEND_CONTEXTS
) -> web.Application:
    """The scheduler service. contexts is the test seam: pass fakes to avoid real back ends."""
    app = create_base_app(SERVICE, settings)
    app.cleanup_ctx.extend(contexts)
    return app
