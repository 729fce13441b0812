"""Cancellation that is never lost, for the scheduler's long-running loops.

On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that arrives just as the
awaited call completes (fixed in 3.12 by rebuilding it on ``asyncio.timeout``). redis-py
awaits through it, so ``task.cancel()`` on a loop that was inside a Redis call at that
moment sees the call return normally, and the loop would go on forever (measured here
against Redis and fakeredis alike: about a third of the cancellations that landed during
a command were lost). The cancel request stays
counted (``Task.cancelling()``), so a loop that checks it before blocking again stops.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if this task was asked to stop and the request got lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def sleep(delay: float) -> None:
    """``asyncio.sleep``, but first honour a cancellation an earlier await swallowed."""
    raise_if_cancelled()
    await asyncio.sleep(delay)
