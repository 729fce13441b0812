"""Run a byte source ahead of its consumer, so that producing and consuming overlap.

Reading and hashing chunks (one worker thread) and writing the assembled file (the blob
store's thread) would otherwise take turns; with a few pieces buffered between them they
run at once, on two cores. Memory stays bounded by ``depth`` pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator


async def read_ahead(source: AsyncGenerator[bytes, None], *, depth: int) -> AsyncIterator[bytes]:
    """The pieces of ``source``, produced by a task of their own up to ``depth`` ahead.

    An exception from ``source`` is raised here after the pieces produced before it, so a
    consumer that must see the source end cleanly (an atomic blob write) still does; a
    consumer that stops early cancels the source, which is closed either way (its files
    and its ``finally`` blocks do not wait for the garbage collector).
    """
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=depth)

    async def produce() -> None:
        async with contextlib.aclosing(source):
            async for piece in source:
                await queue.put(piece)

    producer = asyncio.create_task(produce(), name="read-ahead")
    try:
        while True:
            if queue.empty() and producer.done():
                producer.result()  # the source's exception, if it ended with one
                return
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, producer}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                # The source ended (or failed): what it left in the queue comes first.
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
