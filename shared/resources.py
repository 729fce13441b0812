"""Cleanup contexts that open the back ends of a service and close them on shutdown.

A service lists the ones it needs, in dependency order, in its ``create_app``:
``app.cleanup_ctx.extend([database_ctx, kv_ctx, bus_ctx])``. Each stores its client under
the typed key below and registers a readiness check for ``/readyz``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from shared.blobs import BlobStore, open_blob_store
from shared.bus import MessageBus, open_bus
from shared.db import Database, open_database
from shared.kv import KeyValueStore, open_kv
from shared.web import READINESS_CHECKS, SETTINGS

DB = web.AppKey("db", Database)
KV = web.AppKey("kv", KeyValueStore)
BUS = web.AppKey("bus", MessageBus)
BLOBS = web.AppKey("blobs", BlobStore)


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    database = await open_database(settings.db_url, read_url=settings.db_read_url)
    try:
        if settings.db_migrate:
            await database.migrate()
        app[DB] = database
        app[READINESS_CHECKS]["database"] = database.ping
        if database.has_replica:
            app[READINESS_CHECKS]["database_replica"] = database.ping_replica
        yield
    finally:
        await database.close()


async def kv_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    kv = await open_kv(settings.redis_url, settings.namespace)
    app[KV] = kv
    app[READINESS_CHECKS]["redis"] = kv.ping
    try:
        yield
    finally:
        await kv.close()


async def bus_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    bus = await open_bus(settings.amqp_url, settings.namespace)
    app[BUS] = bus
    app[READINESS_CHECKS]["broker"] = bus.ping
    try:
        yield
    finally:
        await bus.close(grace=settings.shutdown_timeout)


async def blobs_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    blobs = open_blob_store(settings.blob_url)
    app[BLOBS] = blobs
    app[READINESS_CHECKS]["blobs"] = blobs.ping
    try:
        yield
    finally:
        await blobs.close()
