"""The live hub of one api replica: its viewers, cross-replica fan-out, viewer counts.

Fan-out: a new danmaku is published once on the Redis channel ``live:danmaku`` (namespaced
by the key-value store) as ``"<video id>\\n<message text>"``; every replica's hub listens
on it and hands the text, untouched, to its own viewers of that video. The replica that
took the danmaku gets it back through Redis like every other one, so there is one path
and no duplicates. One channel for every video keeps one subscription per replica (not
one per watched video); each replica sees the whole site's danmaku rate, which is small
beside what it spends sending to viewers.

Slow viewers: each viewer has a bounded queue drained by a task of its own, so the fan-out
never awaits a socket. When a viewer's queue is full the new message is dropped for that
viewer alone (counted in ``dropped``): danmaku are ephemeral, and a client that cannot keep
up is better served by the next ones than by a growing backlog. A peer that stops answering
altogether is closed by the WebSocket heartbeat.

Viewer counts: every ``viewer_interval`` seconds each replica writes its count per watched
video into the hash ``live:viewers:<video>`` (field = replica id, value = count and expiry)
and reads back the sum of the fields that have not expired, in one script; a replica that
died stops counting after three intervals. Each replica then pushes
``{"type":"viewers","count":N}`` to its own viewers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import orjson

from shared.kv import KeyValueError, KeyValueStore

logger = logging.getLogger(__name__)

LIVE_CHANNEL: Final = "live:danmaku"
DEFAULT_QUEUE_SIZE: Final = 256
RESUBSCRIBE_DELAY: Final = 1.0
# A replica's count stays in the sum for this many intervals after its last report.
COUNT_LIFETIME_INTERVALS: Final = 3

_REPORT_AND_SUM = """
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (tonumber(ARGV[3]) + tonumber(ARGV[4])))
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local total = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local count, expires = string.match(all[i + 1], '^(%d+):(%d+)$')
  if count and tonumber(expires) > tonumber(ARGV[3]) then
    total = total + tonumber(count)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
if total > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return total
"""


def viewers_key(video_id: str) -> str:
    return f"live:viewers:{video_id}"


Send = Callable[[str], Awaitable[None]]
Close = Callable[[], Awaitable[object]]


class Viewer:
    """One open live socket: a bounded queue and the task that drains it into ``send``.

    Messages are queued from the moment the viewer joins; they go out once ``start()``
    is called (the socket's handshake done).
    """

    def __init__(self, video_id: str, send: Send, close: Close | None, queue_size: int) -> None:
        self.video_id = video_id
        self._send = send
        self.close_socket = close
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self.dropped = 0
        self.delivered = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sending what is queued and what comes next."""
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), name=f"live:viewer:{self.video_id}")

    def offer(self, text: str) -> None:
        """Queue ``text`` without waiting; dropped for this viewer when its queue is full."""
        try:
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            self.dropped += 1

    async def _pump(self) -> None:
        queue = self._queue
        try:
            while True:
                text = await queue.get()
                await self._send(text)
                self.delivered += 1
        except (ConnectionError, RuntimeError) as exc:
            # The socket closed under us; the handler's read loop sees it and leaves.
            logger.debug("live: viewer of %s stopped receiving: %r", self.video_id, exc)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class LiveHub:
    def __init__(
        self,
        kv: KeyValueStore,
        *,
        viewer_interval: float = 5.0,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        replica_id: str | None = None,
    ) -> None:
        self._kv = kv
        self._interval = viewer_interval
        self._queue_size = queue_size
        self.replica_id = replica_id or uuid.uuid4().hex
        self._viewers: dict[str, set[Viewer]] = {}
        self._reported: set[str] = set()
        self._report = kv.script(_REPORT_AND_SUM)
        self._channel = kv.key(LIVE_CHANNEL)
        self.listening = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- viewers ---------------------------------------------------------------------

    def join(
        self, video_id: str, send: Send, close: Close | None = None, *, start: bool = True
    ) -> Viewer:
        """A new viewer of ``video_id``: messages go out through ``send``; ``close`` ends
        its socket when the replica shuts down. With ``start=False`` they wait in its
        queue until ``viewer.start()``: a socket joins before its handshake completes, so
        a client that sees the socket open has missed nothing."""
        viewer = Viewer(video_id, send, close, self._queue_size)
        self._viewers.setdefault(video_id, set()).add(viewer)
        if start:
            viewer.start()
        return viewer

    async def leave(self, viewer: Viewer) -> None:
        watching = self._viewers.get(viewer.video_id)
        if watching is not None:
            watching.discard(viewer)
            if not watching:
                del self._viewers[viewer.video_id]
        await viewer.stop()

    def local_count(self, video_id: str) -> int:
        return len(self._viewers.get(video_id, ()))

    # -- fan-out ---------------------------------------------------------------------

    async def publish(self, video_id: str, text: str) -> None:
        """Send ``text`` to every viewer of ``video_id`` on every replica."""
        await self._kv.publish(LIVE_CHANNEL, f"{video_id}\n{text}")

    def deliver(self, video_id: str, text: str) -> None:
        """Hand ``text`` to this replica's viewers of ``video_id``; never waits."""
        for viewer in self._viewers.get(video_id, ()):
            viewer.offer(text)

    # -- background work -------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="live:listen"),
            asyncio.create_task(self._count_forever(), name="live:viewer-counts"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        viewers = [v for watching in self._viewers.values() for v in watching]
        await asyncio.gather(*(v.stop() for v in viewers))

    async def close_sockets(self) -> None:
        """Close every viewer's socket (shutdown); their handlers then leave."""
        viewers = [v for watching in self._viewers.values() for v in watching]
        await asyncio.gather(
            *(v.close_socket() for v in viewers if v.close_socket is not None),
            return_exceptions=True,
        )

    async def _listen_forever(self) -> None:
        while True:
            try:
                async with self._kv.subscribe(LIVE_CHANNEL) as messages:
                    self.listening.set()
                    async for raw in messages:
                        video_id, _, text = raw.partition("\n")
                        self.deliver(video_id, text)
            except KeyValueError as exc:
                logger.warning("live: lost the fan-out subscription, retrying: %s", exc)
            self.listening.clear()
            await asyncio.sleep(RESUBSCRIBE_DELAY)

    async def _count_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.report_counts()
            except KeyValueError as exc:
                logger.warning("live: cannot report viewer counts: %s", exc)

    async def report_counts(self) -> None:
        """Report this replica's counts, read the sums, push them to the local viewers."""
        watched = set(self._viewers)
        now_ms = int(time.time() * 1000)
        lifetime_ms = int(self._interval * COUNT_LIFETIME_INTERVALS * 1000)
        # Videos nobody watches here any more: take this replica's count out now.
        for video_id in self._reported - watched:
            await self._report(
                keys=[viewers_key(video_id)], args=[self.replica_id, 0, now_ms, lifetime_ms]
            )
        self._reported = watched
        for video_id in watched:
            total = await self._report(
                keys=[viewers_key(video_id)],
                args=[self.replica_id, self.local_count(video_id), now_ms, lifetime_ms],
            )
            text = orjson.dumps({"type": "viewers", "count": int(total)}).decode()
            self.deliver(video_id, text)
