"""The embedded bus: RabbitMQ's semantics inside one process, for standalone mode and tests.

Every ``MemoryBus`` opened on the same ``memory://NAME`` shares one broker, the way the
four standalone apps share one RabbitMQ in production. Like a broker server, a broker
outlives its clients: messages wait in a queue while no consumer is subscribed and
across a bus being closed and opened again (but not across a process restart).
Bodies travel as the same JSON bytes as on RabbitMQ, so a malformed body parks here too.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache

from shared.bus.event import Event, MalformedEventError
from shared.bus.port import (
    ATTEMPTS_HEADER,
    DEFAULT_CLOSE_GRACE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PREFETCH,
    DEFAULT_RETRY_DELAYS,
    REQUEST_ID_HEADER,
    BusTopologyError,
    BusUnavailableError,
    Handler,
    Headers,
    Outcome,
    OutcomeResult,
    ParkedMessage,
    QueueSpec,
    QueueStats,
    attempts_of,
    check_name,
    describe,
    next_step_after,
    outgoing_headers,
    parked_headers,
    parked_message,
    requeued_headers,
)
from shared.logging import request_id_var

logger = logging.getLogger(__name__)

DEFAULT_BROKER = "default"


@dataclass(slots=True)
class _Message:
    body: bytes
    headers: Headers
    routing_key: str


@dataclass(eq=False, slots=True)
class _Queue:
    name: str
    ready: deque[_Message] = field(default_factory=deque)
    consumers: list[MemorySubscription] = field(default_factory=list)
    # Messages waiting out a retry delay: the delay queues of the RabbitMQ adapter.
    delayed: set[asyncio.TimerHandle] = field(default_factory=set)
    next_consumer: int = 0

    def put(self, message: _Message, *, front: bool = False) -> None:
        if front:
            self.ready.appendleft(message)
        else:
            self.ready.append(message)
        self.dispatch()

    def put_later(self, delay: float, message: _Message) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self.delayed.discard(handle)
            self.put(message)

        handle = loop.call_later(delay, fire)
        self.delayed.add(handle)

    def dispatch(self) -> None:
        """Hand ready messages round-robin to consumers with a free prefetch slot."""
        while self.ready:
            consumer = self._free_consumer()
            if consumer is None:
                return
            consumer.deliver(self.ready.popleft())

    def _free_consumer(self) -> MemorySubscription | None:
        count = len(self.consumers)
        for offset in range(count):
            index = (self.next_consumer + offset) % count
            if self.consumers[index].has_capacity:
                self.next_consumer = (index + 1) % count
                return self.consumers[index]
        return None

    def drop(self) -> None:
        for handle in self.delayed:
            handle.cancel()
        self.delayed.clear()
        self.ready.clear()


class _Broker:
    """Exchanges (topic bindings) and queues, by full name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bindings: dict[str, dict[str, set[str]]] = {}  # exchange -> queue -> keys
        self.queues: dict[str, _Queue] = {}
        # The x-message-ttl (ms) each delay queue was declared with, as RabbitMQ keeps it.
        self.retry_ttls: dict[str, int] = {}

    def declare_exchange(self, exchange: str) -> None:
        self.bindings.setdefault(exchange, {})

    def declare_queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Queue(name)
        return queue

    def bind(self, exchange: str, queue: str, key: str) -> None:
        self.bindings.setdefault(exchange, {}).setdefault(queue, set()).add(key)

    def route(self, exchange: str, message: _Message) -> None:
        # Each matching queue gets one copy however many of its keys match.
        for queue_name, keys in self.bindings.get(exchange, {}).items():
            queue = self.queues.get(queue_name)
            if queue is not None and any(topic_matches(k, message.routing_key) for k in keys):
                queue.put(_Message(message.body, dict(message.headers), message.routing_key))

    def declare_retry_queues(self, spec: QueueSpec) -> None:
        wanted = {name: round(delay * 1000) for name, delay in spec.retry_queues}
        for name, ttl in wanted.items():
            current = self.retry_ttls.get(name, ttl)
            if current != ttl:
                raise BusTopologyError(
                    f"inequivalent arg 'x-message-ttl' for queue {name!r}:"
                    f" received {ttl} but current is {current}"
                )
        self.retry_ttls.update(wanted)

    def delete_queue(self, name: str) -> None:
        self.retry_ttls.pop(name, None)
        queue = self.queues.pop(name, None)
        if queue is not None:
            queue.drop()
        for bound in self.bindings.values():
            bound.pop(name, None)

    def delete_exchange(self, exchange: str) -> None:
        self.bindings.pop(exchange, None)


# One broker per name for the whole process: the bus of each standalone app finds the
# others' queues here.
_BROKERS: dict[str, _Broker] = {}


def _broker(name: str) -> _Broker:
    broker = _BROKERS.get(name)
    if broker is None:
        broker = _BROKERS[name] = _Broker(name)
    return broker


@lru_cache(maxsize=4096)
def topic_matches(binding_key: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more."""
    pattern = binding_key.split(".")
    words = routing_key.split(".")

    @cache
    def match(p: int, w: int) -> bool:
        if p == len(pattern):
            return w == len(words)
        if pattern[p] == "#":
            return any(match(p + 1, rest) for rest in range(w, len(words) + 1))
        if w == len(words):
            return False
        return pattern[p] in ("*", words[w]) and match(p + 1, w + 1)

    return match(0, 0)


class MemorySubscription:
    """A consumer of one in-process queue; prefetch is the number of handlers at once."""

    def __init__(
        self,
        bus: MemoryBus,
        *,
        spec: QueueSpec,
        queue: _Queue,
        handler: Handler,
        prefetch: int,
        on_outcome: Callable[[Outcome], None] | None,
    ) -> None:
        self._bus = bus
        self._spec = spec
        self._queue = queue
        self._handler = handler
        self._prefetch = prefetch
        self._on_outcome = on_outcome
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def queue(self) -> str:
        return self._spec.queue

    @property
    def has_capacity(self) -> bool:
        return not self._closing and len(self._tasks) < self._prefetch

    def start(self) -> None:
        self._queue.consumers.append(self)
        self._queue.dispatch()

    def deliver(self, message: _Message) -> None:
        # A fresh context, as a handler in another process would have: nothing of the
        # publisher's context (its request id included) leaks in except through headers.
        task = asyncio.get_running_loop().create_task(
            self._process(message),
            name=f"bus:{self._spec.main}",
            context=contextvars.Context(),
        )
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("bus consumer of %s crashed", self._spec.main, exc_info=task.exception())
        self._queue.dispatch()

    async def _process(self, message: _Message) -> None:
        failures = attempts_of(message.headers)
        request_id = message.headers.get(REQUEST_ID_HEADER)
        request_id_var.set(request_id if isinstance(request_id, str) else None)
        try:
            event = Event.from_json(message.body)
        except MalformedEventError as exc:
            logger.error(  # noqa: TRY400 -- the reason is the message; no traceback to show
                "bus: malformed message on %s parked: %s", self._spec.main, exc
            )
            self._park(message, f"malformed event: {exc}", failures)
            self._report(message, None, "parked", failures + 1, str(exc))
            return
        try:
            await self._handler(event)
        except asyncio.CancelledError:
            # Cancelled by close(): unacked, so back to where it was in the queue.
            self._queue.put(message, front=True)
            self._report(message, event.id, "requeued", failures + 1, None)
            raise
        # Whatever a handler raises is this message's failure; _fail logs it with its
        # traceback.
        except Exception as exc:  # noqa: BLE001
            self._fail(message, event, failures + 1, exc)
            return
        self._report(message, event.id, "acked", failures + 1, None)

    def _fail(self, message: _Message, event: Event, failures: int, exc: Exception) -> None:
        error = describe(exc)
        step = next_step_after(self._spec, failures, exc)
        if step is None:
            logger.error(
                "bus: %s %s failed %d times, parked",
                self._spec.main,
                event.id,
                failures,
                exc_info=exc,
            )
            self._park(message, error, failures)
            self._report(message, event.id, "parked", failures, error)
            return
        _, delay = step
        logger.warning(
            "bus: %s %s failed (attempt %d), retry in %.3gs",
            self._spec.main,
            event.id,
            failures,
            delay,
            exc_info=exc,
        )
        headers = dict(message.headers)
        headers[ATTEMPTS_HEADER] = failures
        self._queue.put_later(delay, _Message(message.body, headers, message.routing_key))
        self._report(message, event.id, "retried", failures, error)

    def _park(self, message: _Message, error: str, attempts: int) -> None:
        parked = self._bus.broker.declare_queue(self._spec.parked)
        headers = parked_headers(
            message.headers, routing_key=message.routing_key, error=error, attempts=attempts
        )
        parked.put(_Message(message.body, headers, message.routing_key))

    def _report(
        self,
        message: _Message,
        event_id: str | None,
        result: OutcomeResult,
        attempt: int,
        error: str | None,
    ) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(
                Outcome(self._spec.queue, message.routing_key, event_id, result, attempt, error)
            )
        except Exception:
            logger.exception("bus: on_outcome callback of %s failed", self._spec.main)

    async def close(self, *, grace: float | None = DEFAULT_CLOSE_GRACE) -> None:
        if self._closing:
            return
        self._closing = True
        if self in self._queue.consumers:
            self._queue.consumers.remove(self)
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._bus.forget(self)
        # Anything this consumer gave back goes to the others now.
        self._queue.dispatch()


class MemoryBus:
    """The in-process adapter of ``MessageBus``."""

    def __init__(self, broker: _Broker, namespace: str) -> None:
        check_name("namespace", namespace)
        self.broker = broker
        self._namespace = namespace
        self._exchange = f"{namespace}.events"
        self._subscriptions: set[MemorySubscription] = set()
        self._closed = False
        broker.declare_exchange(self._exchange)

    @classmethod
    def open(cls, name: str, namespace: str) -> MemoryBus:
        return cls(_broker(name or DEFAULT_BROKER), namespace)

    @property
    def namespace(self) -> str:
        return self._namespace

    def _check_open(self) -> None:
        if self._closed:
            raise BusUnavailableError("the message bus is closed")

    async def publish(self, event: Event, *, headers: Mapping[str, str] | None = None) -> None:
        await self.publish_raw(event.type, event.to_json(), headers=headers)

    async def publish_many(
        self, events: Iterable[Event], *, headers: Mapping[str, str] | None = None
    ) -> None:
        for event in events:
            await self.publish(event, headers=headers)

    async def publish_raw(
        self, routing_key: str, body: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        self._check_open()
        message = _Message(
            bytes(body), outgoing_headers(headers, request_id_var.get()), routing_key
        )
        self.broker.route(self._exchange, message)

    async def declare_queue(
        self,
        queue: str,
        routing_keys: Sequence[str],
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    ) -> None:
        self._declare(
            QueueSpec.build(self._namespace, queue, routing_keys, max_attempts, retry_delays)
        )

    def _declare(self, spec: QueueSpec) -> _Queue:
        self._check_open()
        self.broker.declare_exchange(self._exchange)
        self.broker.declare_retry_queues(spec)
        main = self.broker.declare_queue(spec.main)
        self.broker.declare_queue(spec.parked)
        for key in spec.routing_keys:
            self.broker.bind(self._exchange, spec.main, key)
        return main

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
    ) -> MemorySubscription:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        spec = QueueSpec.build(self._namespace, queue, routing_keys, max_attempts, retry_delays)
        main = self._declare(spec)
        subscription = MemorySubscription(
            self, spec=spec, queue=main, handler=handler, prefetch=prefetch, on_outcome=on_outcome
        )
        self._subscriptions.add(subscription)
        subscription.start()
        return subscription

    def forget(self, subscription: MemorySubscription) -> None:
        self._subscriptions.discard(subscription)

    async def parked(self, queue: str, *, limit: int = 100) -> list[Event]:
        messages = await self.parked_messages(queue, limit=limit)
        return [event for m in messages if (event := m.event) is not None]

    async def parked_messages(self, queue: str, *, limit: int = 100) -> list[ParkedMessage]:
        self._check_open()
        check_name("queue", queue)
        parked = self.broker.queues.get(f"{self._namespace}.{queue}.parked")
        if parked is None:
            return []
        return [
            parked_message(m.body, dict(m.headers), m.routing_key)
            for m in list(parked.ready)[:limit]
        ]

    async def requeue_parked(self, queue: str, *, limit: int = 100) -> int:
        self._check_open()
        check_name("queue", queue)
        main = self.broker.queues.get(f"{self._namespace}.{queue}")
        parked = self.broker.queues.get(f"{self._namespace}.{queue}.parked")
        if main is None or parked is None:
            return 0
        moved = 0
        while parked.ready and moved < limit:
            message = parked.ready.popleft()
            main.put(_Message(message.body, requeued_headers(message.headers), message.routing_key))
            moved += 1
        return moved

    async def queue_stats(self, queue: str) -> QueueStats:
        self._check_open()
        check_name("queue", queue)
        main = self.broker.queues.get(f"{self._namespace}.{queue}")
        parked = self.broker.queues.get(f"{self._namespace}.{queue}.parked")
        if main is None:
            return QueueStats(ready=0, retrying=0, parked=0, consumers=0)
        return QueueStats(
            ready=len(main.ready),
            retrying=len(main.delayed),
            parked=0 if parked is None else len(parked.ready),
            consumers=len(main.consumers),
        )

    async def queue_depth(self, queue: str) -> int:
        self._check_open()
        check_name("queue", queue)
        main = self.broker.queues.get(f"{self._namespace}.{queue}")
        return 0 if main is None else len(main.ready)

    async def ping(self) -> None:
        self._check_open()

    async def delete_namespace(self, queues: Iterable[str]) -> None:
        self._check_open()
        for queue in queues:
            check_name("queue", queue)
            main = f"{self._namespace}.{queue}"
            self.broker.delete_queue(main)
            self.broker.delete_queue(f"{main}.parked")
            for name in [n for n in self.broker.retry_ttls if n.startswith(f"{main}.retry.")]:
                self.broker.delete_queue(name)
        self.broker.delete_exchange(self._exchange)

    async def close(self, *, grace: float | None = DEFAULT_CLOSE_GRACE) -> None:
        if self._closed:
            return
        await asyncio.gather(*(s.close(grace=grace) for s in list(self._subscriptions)))
        self._closed = True
