"""Slow request bodies: the gateway drops a client that sends its body too slowly.

aiohttp bounds nothing while a handler waits for body bytes, so a client dribbling a
byte every few seconds (slowloris on the body) would hold a connection, a handler and
an upstream connection for as long as it likes. ``paced_body`` reads the body for the
proxy and counts only the time the gateway spends *waiting for the client*: time in
which the upstream is slow to take the bytes (back-pressure) is never held against it.

Two bounds, both from settings:

- ``client_body_timeout``: the longest single wait for the next piece of the body
  (nginx's ``client_body_timeout``);
- ``client_min_body_rate``: over the whole body, the waits may add up to at most
  ``client_body_timeout + received / client_min_body_rate`` seconds, so a client that
  sends one byte just inside every timeout is still dropped.

When either is exceeded the client's connection is closed: nothing can be answered on
it honestly (the upstream has the headers and part of the body), and closing it frees
the handler (the gateway runs with ``handler_cancellation``) and the upstream request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

logger = logging.getLogger(__name__)


class ClientTooSlowError(Exception):
    """The client's body stalled or crawled; its connection has been closed."""


@dataclass(frozen=True, slots=True)
class BodyPace:
    """The bounds on a client's request body (see the module docstring)."""

    timeout: float
    min_rate: int

    def allowed_wait(self, received: int) -> float:
        """Total seconds of waiting allowed once ``received`` bytes have arrived."""
        if self.min_rate <= 0:
            return float("inf")
        return self.timeout + received / self.min_rate


async def paced_body(
    request: web.Request, pace: BodyPace, chunk_bytes: int
) -> AsyncIterator[bytes]:
    """The request body in pieces of up to ``chunk_bytes``: whatever has arrived.

    A piece goes upstream as soon as there is one (topped up with bytes already buffered,
    never waiting for more): the upstream sees the headers only with the first piece,
    and may refuse early (a 413 on ``Content-Length``). Raises ``ClientTooSlowError``
    after closing the connection of a too-slow client.
    """
    content = request.content
    received = 0
    waited = 0.0
    while True:
        budget = max(0.0, min(pace.timeout, pace.allowed_wait(received) - waited))
        started = time.monotonic()
        try:
            async with asyncio.timeout(budget):
                piece = await content.read(chunk_bytes)
        except TimeoutError:
            _drop(request, received, waited + budget)
            raise ClientTooSlowError from None
        waited += time.monotonic() - started
        if not piece:
            return
        parts = [piece]
        size = len(piece)
        while size < chunk_bytes and (more := content.read_nowait(chunk_bytes - size)):
            parts.append(more)
            size += len(more)
        received += size
        # The time spent here, while the upstream takes the piece, is not waited.
        yield parts[0] if len(parts) == 1 else b"".join(parts)


def _drop(request: web.Request, received: int, waited: float) -> None:
    logger.warning(
        "dropping a client that sent %d body bytes in %.1f s of waiting (too slow)",
        received,
        waited,
    )
    transport = request.transport
    if transport is not None:
        transport.close()
