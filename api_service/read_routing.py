"""Which database reads of a request may go to the read replica (``VOD_DB_READ_URL``).

Repositories choose per query: ``db.reader()`` for reads that may lag (lists, search,
public pages), ``db.connect()`` for the primary. This module decides, per request, when
even the ``reader()`` reads must see the caller's own writes ("read your writes"):

- a request that writes (any method but GET, HEAD, OPTIONS) reads the primary throughout,
  so what it checks before writing is current;
- after such a request succeeds for a signed-in user, that user is *pinned* for
  ``VOD_DB_READ_YOUR_WRITES_SECONDS`` (a Redis key with that lifetime, so every api replica
  agrees): their reads go to the primary until the replica has surely caught up. The owner
  sees their new video in their own list at once; everyone else reads the replica.

Without a replica nothing here runs: no Redis lookups, every read on the primary.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from shared.auth import USER_ID_HEADER
from shared.db import reads_on_primary
from shared.kv import KeyValueStore, KeyValueUnavailableError

logger = logging.getLogger(__name__)

READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PIN_PREFIX = "db:primary-reads:"
_CLIENT_ERROR = 400


class ReadYourWrites:
    """Per-user pins in Redis: "this user wrote less than ``seconds`` ago"."""

    def __init__(self, kv: KeyValueStore, *, seconds: float) -> None:
        self._kv = kv
        self._seconds = seconds

    async def pin(self, user_id: str) -> None:
        """Mark ``user_id`` as having just written (renews the window)."""
        try:
            await self._kv.set(_PIN_PREFIX + user_id, "1", ex=self._seconds)
        except KeyValueUnavailableError:
            # The write itself succeeded; losing the pin only risks a stale list for the
            # replica's lag, which is not worth failing the request for.
            logger.warning("read routing: could not pin a writer to the primary (Redis down)")

    async def pinned(self, user_id: str) -> bool:
        """Whether ``user_id``'s reads must go to the primary. Without Redis: yes (the
        primary is always right, only busier)."""
        try:
            return await self._kv.exists(_PIN_PREFIX + user_id)
        except KeyValueUnavailableError:
            return True


def read_routing_middleware(pins: web.AppKey[ReadYourWrites]) -> Middleware:
    """The middleware that applies the rules above; install it only with a replica.

    ``pins`` is the app key under which the ``ReadYourWrites`` is stored once Redis is open
    (the middleware list is fixed before the back ends open).
    """

    @web.middleware
    async def read_routing(request: web.Request, handler: Handler) -> web.StreamResponse:
        user_id = request.headers.get(USER_ID_HEADER)
        writes = request.method not in READ_ONLY_METHODS
        store = request.app[pins]
        if not writes and not (user_id and await store.pinned(user_id)):
            return await handler(request)
        with reads_on_primary():
            response = await handler(request)
        if writes and user_id and response.status < _CLIENT_ERROR:
            await store.pin(user_id)
        return response

    return read_routing
