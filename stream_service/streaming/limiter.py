"""The stream connection limiter: a bounded number of streams, never a queue.

Per replica: at most ``capacity`` streams at once, and at most ``per_client`` for one
client address. A request over either limit is refused at once (429 + Retry-After) so a
client backs off instead of piling up in a queue; a slot is freed the moment its stream
ends, whether it finished or the client went away.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from shared.errors import RateLimitedError


class StreamLimiter:
    def __init__(
        self,
        *,
        capacity: int,
        per_client: int,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self.capacity = capacity
        self.per_client = per_client
        self.active = 0
        self._on_refused = on_refused
        self._by_client: Counter[str] = Counter()

    @contextmanager
    def slot(self, client: str) -> Iterator[None]:
        """Holds one stream slot for ``client`` for the duration of the block."""
        if self.active >= self.capacity:
            self._on_refused()
            raise RateLimitedError(
                "The server is streaming to as many clients as it can; retry shortly.",
                retry_after=1,
                code="too_many_streams",
            )
        if self._by_client[client] >= self.per_client:
            self._on_refused()
            raise RateLimitedError(
                "Too many streams open from your address; close one first.",
                retry_after=1,
                code="too_many_streams_per_client",
            )
        self.active += 1
        self._by_client[client] += 1
        try:
            yield
        finally:
            self.active -= 1
            self._by_client[client] -= 1
            if self._by_client[client] <= 0:
                del self._by_client[client]
