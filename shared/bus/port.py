"""What every bus adapter promises: the protocols, the errors and the retry rules they share."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from shared.bus.event import Event, MalformedEventError
from shared.errors import ServiceUnavailableError

# Header names on the wire. A consumer in another language needs nothing else to take
# part in the retry protocol.
REQUEST_ID_HEADER = "x-request-id"
ATTEMPTS_HEADER = "x-attempts"  # failed handler runs so far
ERROR_HEADER = "x-error"  # why a parked message was parked
PARKED_AT_HEADER = "x-parked-at"
ROUTING_KEY_HEADER = "x-original-routing-key"

DEFAULT_PREFETCH = 32
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (1.0, 5.0, 30.0)
DEFAULT_CLOSE_GRACE = 30.0
# A traceback-sized error text is enough to diagnose and keeps headers small
# (RabbitMQ refuses frames over its frame_max).
MAX_ERROR_CHARS = 2000

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")

HeaderValue = str | int
Headers = dict[str, HeaderValue]
Handler = Callable[[Event], Awaitable[None]]
OutcomeResult = Literal["acked", "retried", "parked", "requeued"]


class BusUnavailableError(ServiceUnavailableError):
    """The broker cannot be reached (or the bus is closed); raised within a bounded time.

    A 503 when it reaches an HTTP client; the outbox relay treats it as "try later".
    """

    code = "bus_unavailable"


class BusTopologyError(Exception):
    """A queue or exchange exists on the broker with other arguments than asked for.

    A deployment problem (for example retry delays changed under a live queue), not an
    outage: retrying does not help, deleting the old queue does.
    """


class PermanentError(Exception):
    """Raised by a handler for a message that can never succeed (a payload that breaks a
    rule, a file that cannot be decoded): the message is parked at once, not retried.
    """


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one delivery was settled; reported to ``subscribe(on_outcome=...)`` for metrics."""

    queue: str
    routing_key: str
    event_id: str | None  # None when the body was not an event at all
    result: OutcomeResult
    attempt: int  # 1 for the first run of the handler
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """A message that gave up: its original body and headers, and why."""

    body: bytes
    headers: Headers
    routing_key: str
    error: str
    attempts: int

    @property
    def event(self) -> Event | None:
        try:
            return Event.from_json(self.body)
        except MalformedEventError:
            return None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Where the messages of one consumer queue are, as far as the broker can tell.

    Messages a consumer holds unacked are in none of these: AMQP reports only the ready
    count of a queue (the consumers know their own; ``scheduler_service`` adds them up).
    """

    ready: int  # waiting in the queue for a consumer
    retrying: int  # waiting out a retry delay (in the delay queues)
    parked: int  # given up, waiting for an operator
    consumers: int  # subscriptions taking messages from the queue now


class Subscription(Protocol):
    @property
    def queue(self) -> str:
        """The short queue name given to ``subscribe``."""
        ...

    async def close(self, *, grace: float | None = DEFAULT_CLOSE_GRACE) -> None:
        """Stop taking messages; let running handlers finish, for at most ``grace`` seconds.

        Handlers still running after that are cancelled. Every message not acked
        by then goes back to the queue for the next consumer.
        """
        ...


class MessageBus(Protocol):
    """The port: topic publish/subscribe with at-least-once delivery.

    Queues are durable and named ``{namespace}.{queue}``; a handler that raises has its
    message delivered again after the next delay of ``retry_delays``, and after
    ``max_attempts`` failed runs (or at once, if it raised ``PermanentError``) the message
    moves to ``{namespace}.{queue}.parked``.
    """

    @property
    def namespace(self) -> str: ...

    async def publish(self, event: Event, *, headers: Mapping[str, str] | None = None) -> None:
        """Publish and return once the broker has taken it; ``BusUnavailableError`` if not."""
        ...

    async def publish_many(
        self, events: Iterable[Event], *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish many with confirmations in flight together; order is not kept.

        On ``BusUnavailableError`` some may have been published: publish them all again
        (consumers deduplicate on ``Event.id``).
        """
        ...

    async def publish_raw(
        self, routing_key: str, body: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish an already serialised body (an outbox row) as it is."""
        ...

    async def declare_queue(
        self,
        queue: str,
        routing_keys: Sequence[str],
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    ) -> None:
        """Create the queue, its retry path and parking queue, and bind it; idempotent.

        From then on matching events are kept for the queue's consumers, none of which
        need be running yet.
        """
        ...

    async def subscribe(
        self,
        queue: str,
        routing_keys: Sequence[str],
        handler: Handler,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> Subscription:
        """Declare the queue (as ``declare_queue``) and run ``handler`` on its messages.

        At most ``prefetch`` handlers run at once. The request id of the publisher is
        set in ``shared.logging.request_id_var`` while the handler runs.
        """
        ...

    async def parked(self, queue: str, *, limit: int = 100) -> list[Event]:
        """The events in ``queue``'s parking queue (bodies that are not events left out)."""
        ...

    async def parked_messages(self, queue: str, *, limit: int = 100) -> list[ParkedMessage]:
        """Everything in ``queue``'s parking queue, oldest first, left in place."""
        ...

    async def requeue_parked(self, queue: str, *, limit: int = 100) -> int:
        """Move up to ``limit`` parked messages of ``queue`` back to it, oldest first;
        returns how many moved.

        Each starts again with a full set of attempts: its attempt count, error and
        parking time are dropped; body, request id, other headers and original routing
        key are kept. A message is put back in the main queue before it leaves the parking
        queue, so a crash in between duplicates it (consumers deduplicate) and never loses
        it. A queue never declared moves nothing.
        """
        ...

    async def queue_depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not counting those being handled or delayed)."""
        ...

    async def queue_stats(self, queue: str) -> QueueStats:
        """Ready, retrying and parked counts of a consumer queue; zeros if never declared."""
        ...

    async def ping(self) -> None:
        """Return if the broker answers, else raise ``BusUnavailableError``."""
        ...

    async def delete_namespace(self, queues: Iterable[str]) -> None:
        """Delete the exchange and each named queue with its retry and parking queues."""
        ...

    async def close(self, *, grace: float | None = DEFAULT_CLOSE_GRACE) -> None:
        """Close every subscription (``Subscription.close``), then the connection."""
        ...


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue's full names and retry rules, validated once for both adapters."""

    namespace: str
    queue: str
    routing_keys: tuple[str, ...]
    max_attempts: int
    retry_delays: tuple[float, ...]

    @classmethod
    def build(
        cls,
        namespace: str,
        queue: str,
        routing_keys: Sequence[str],
        max_attempts: int,
        retry_delays: Sequence[float],
    ) -> QueueSpec:
        check_name("queue", queue)
        # A bare string is a Sequence[str] too, and would bind one key per character.
        if isinstance(routing_keys, str) or not routing_keys:
            raise ValueError("routing_keys must be a non-empty sequence of binding keys")
        for key in routing_keys:
            if not isinstance(key, str) or not key or any(not w for w in key.split(".")):
                raise ValueError(f"bad binding key {key!r}")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        delays = tuple(float(d) for d in retry_delays)
        if max_attempts > 1 and not delays:
            raise ValueError("retry_delays must not be empty when max_attempts > 1")
        if any(round(d * 1000) < 1 for d in delays):
            raise ValueError("every retry delay must be at least 1 ms")
        return cls(namespace, queue, tuple(dict.fromkeys(routing_keys)), max_attempts, delays)

    @property
    def main(self) -> str:
        return f"{self.namespace}.{self.queue}"

    @property
    def parked(self) -> str:
        return f"{self.main}.parked"

    def retry_queue(self, index: int) -> str:
        return f"{self.main}.retry.{index}"

    @property
    def retry_queues(self) -> list[tuple[str, float]]:
        """(name, delay) of each delay queue; never more than there are retries."""
        count = min(len(self.retry_delays), self.max_attempts - 1)
        return [(self.retry_queue(i + 1), self.retry_delays[i]) for i in range(count)]

    def next_step(self, failures: int) -> tuple[str, float] | None:
        """Where a message goes after its ``failures``-th failed run: a delay queue, or
        None for the parking queue. Past the last delay, the last one repeats."""
        if failures >= self.max_attempts:
            return None
        queues = self.retry_queues
        return queues[min(failures, len(queues)) - 1]


def check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{what} name {name!r}: 1-100 of letters, digits, '_', '.', '-'")


def outgoing_headers(
    headers: Mapping[str, str] | None, request_id: str | None
) -> dict[str, HeaderValue]:
    result: dict[str, HeaderValue] = dict(headers or {})
    if request_id is not None:
        result.setdefault(REQUEST_ID_HEADER, request_id)
    return result


def attempts_of(headers: Mapping[str, object]) -> int:
    """Failed runs so far; anything unreadable counts as none, so it cannot crash us."""
    value = headers.get(ATTEMPTS_HEADER)
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str | bytes):
        digits = value.strip()
        # isascii: str.isdigit() also accepts digits such as "²" that int() refuses; the
        # length keeps int() away from its limit on huge strings.
        if digits.isascii() and digits.isdigit() and len(digits) <= 9:  # noqa: PLR2004
            return int(digits)
    return 0


def parked_headers(
    headers: Mapping[str, HeaderValue], *, routing_key: str, error: str, attempts: int
) -> Headers:
    result: Headers = dict(headers)
    result[ATTEMPTS_HEADER] = attempts
    result[ERROR_HEADER] = error[:MAX_ERROR_CHARS]
    result[PARKED_AT_HEADER] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    result.setdefault(ROUTING_KEY_HEADER, routing_key)
    return result


def next_step_after(spec: QueueSpec, failures: int, exc: BaseException) -> tuple[str, float] | None:
    """``spec.next_step``, except that a ``PermanentError`` goes straight to parking."""
    return None if isinstance(exc, PermanentError) else spec.next_step(failures)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


def requeued_headers(headers: Mapping[str, HeaderValue]) -> Headers:
    """A parked message's headers for its fresh start: the retry bookkeeping dropped."""
    dropped = (ATTEMPTS_HEADER, ERROR_HEADER, PARKED_AT_HEADER)
    return {key: value for key, value in headers.items() if key not in dropped}


def parked_message(body: bytes, headers: Headers, routing_key: str) -> ParkedMessage:
    error = headers.get(ERROR_HEADER, "")
    return ParkedMessage(
        body=body,
        headers=headers,
        routing_key=str(headers.get(ROUTING_KEY_HEADER, routing_key)),
        error=str(error),
        attempts=attempts_of(headers),
    )
