"""Live sockets follow the access token they were opened with.

The gateway checks a socket's token once, at the handshake; a socket then lives for as
long as its viewer watches. So that signing out (or the token running out) ends it as it
ends the token's HTTP requests, every socket opened with a token is registered here, by
token id, refresh family and user, for as long as it is open:

- **expiry**: a timer per socket closes it with 4401 at the token's ``exp``;
- **revocation**: the replica that revokes publishes ``"<kind> <subject>"`` on
  ``REVOCATIONS_CHANNEL`` (``api_service.services.revocations``); every replica's watch
  is subscribed and closes the matching sockets with 4401, within a round trip;
- **missed messages**: a socket's token is looked up in the revocation list once it is
  registered (it may have been revoked between the gateway's check and now), and every
  socket's again each time the subscription is (re)established (messages published while
  it was down are lost) and after the revocations are restored into an emptied store
  (the gateway let tokens through while it was empty).

Any socket that is opened with a token uses it the same way (``guard``); the gateway's
bridge passes the close code on to the browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from shared.auth import REVOCATIONS_CHANNEL, Identity, revoked_family_key, revoked_token_key
from shared.kv import KeyValueError, KeyValueStore

logger = logging.getLogger(__name__)

CLOSE_TOKEN_ENDED: Final = 4401
CLOSE_BACK_END_FAILED: Final = 1011
RESUBSCRIBE_DELAY: Final = 1.0

# close(code, reason): ends one socket; may be awaited from any task.
Close = Callable[[int, str], Awaitable[object]]
# Called each time the subscription is (re)established, before sockets are re-checked.
OnSubscribed = Callable[[], Awaitable[object]]


class Watched:
    """One open socket and the token it was opened with."""

    __slots__ = ("close", "ended", "identity", "timer")

    def __init__(self, identity: Identity, close: Close) -> None:
        self.identity = identity
        self.close = close
        self.ended = False
        self.timer: asyncio.TimerHandle | None = None


class TokenWatch:
    def __init__(
        self,
        kv: KeyValueStore,
        *,
        on_subscribed: OnSubscribed | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._kv = kv
        self._on_subscribed = on_subscribed
        self._clock = clock
        # kind ("jti", "family", "user") -> subject -> the sockets it names
        self._index: dict[str, dict[str, set[Watched]]] = {"jti": {}, "family": {}, "user": {}}
        self._closing: set[asyncio.Task[object]] = set()
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    # -- sockets ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def guard(self, identity: Identity | None, close: Close) -> AsyncIterator[None]:
        """For the block, ``close`` ends the socket when ``identity``'s token expires or
        is revoked (nothing for an anonymous socket)."""
        if identity is None:
            yield
            return
        watched = self.watch(identity, close)
        try:
            await self._check(watched)
            yield
        finally:
            self.unwatch(watched)

    def watch(self, identity: Identity, close: Close) -> Watched:
        watched = Watched(identity, close)
        for kind, subject in _subjects(identity):
            self._index[kind].setdefault(subject, set()).add(watched)
        delay = identity.expires_at - self._clock()
        if delay <= 0:
            self._end(watched, CLOSE_TOKEN_ENDED, "the access token has expired")
        else:
            watched.timer = asyncio.get_running_loop().call_later(
                delay, self._end, watched, CLOSE_TOKEN_ENDED, "the access token has expired"
            )
        return watched

    def unwatch(self, watched: Watched) -> None:
        if watched.timer is not None:
            watched.timer.cancel()
        for kind, subject in _subjects(watched.identity):
            sockets = self._index[kind].get(subject)
            if sockets is not None:
                sockets.discard(watched)
                if not sockets:
                    del self._index[kind][subject]

    def watching(self) -> int:
        """How many sockets are registered (tests, metrics)."""
        return sum(len(sockets) for sockets in self._index["jti"].values())

    def revoked(self, kind: str, subject: str) -> None:
        """Ends every socket whose token ``kind`` / ``subject`` names."""
        for watched in list(self._index.get(kind, {}).get(subject, ())):
            self._end(watched, CLOSE_TOKEN_ENDED, "this session has been signed out")

    def _end(self, watched: Watched, code: int, reason: str) -> None:
        if watched.ended:
            return
        watched.ended = True
        if watched.timer is not None:
            watched.timer.cancel()
        task: asyncio.Task[object] = asyncio.create_task(
            _call(watched.close, code, reason), name="live:token-ended"
        )
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[object]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.warning("live: closing a socket whose token ended failed: %r", error)

    async def _check(self, watched: Watched) -> None:
        """Ends ``watched`` if the revocation list names its token."""
        identity = watched.identity
        try:
            revoked = await self._kv.exists(revoked_token_key(identity.token_id)) or (
                await self._kv.exists(revoked_family_key(identity.family_id))
            )
        except KeyValueError as error:
            # Never "assume not revoked": the socket ends, the client reconnects later.
            logger.warning("live: cannot read the revocation list: %s", error)
            self._end(watched, CLOSE_BACK_END_FAILED, "back end unavailable")
            return
        if revoked:
            self._end(watched, CLOSE_TOKEN_ENDED, "this session has been signed out")

    async def check_all(self) -> None:
        """Looks every socket's token up in the revocation list (after a restore)."""
        everyone = {w for sockets in self._index["jti"].values() for w in sockets}
        for watched in everyone:
            if not watched.ended:
                await self._check(watched)

    # -- the subscription ------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen_forever(), name="live:revocations")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        everyone = {w for sockets in self._index["jti"].values() for w in sockets}
        for watched in everyone:
            if watched.timer is not None:
                watched.timer.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _listen_forever(self) -> None:
        while True:
            try:
                async with self._kv.subscribe(REVOCATIONS_CHANNEL) as messages:
                    if self._on_subscribed is not None:
                        await self._on_subscribed()
                    # Revocations published while unsubscribed were missed: look them up.
                    await self.check_all()
                    self.listening.set()
                    async for message in messages:
                        kind, _, subject = message.partition(" ")
                        self.revoked(kind, subject)
            except KeyValueError as error:
                logger.warning("live: lost the revocation subscription, retrying: %s", error)
            self.listening.clear()
            await asyncio.sleep(RESUBSCRIBE_DELAY)


def _subjects(identity: Identity) -> tuple[tuple[str, str], ...]:
    return (
        ("jti", identity.token_id),
        ("family", identity.family_id),
        ("user", identity.user_id),
    )


async def _call(close: Close, code: int, reason: str) -> object:
    return await close(code, reason)
