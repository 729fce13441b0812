"""The RabbitMQ adapter (aio-pika, robust connection).

Topology of one namespace ``ns`` and one queue ``q``::

    ns.events (topic, durable) --binding keys--> ns.q (durable)
    ns.q.retry.1 .. ns.q.retry.N   x-message-ttl = the delay, then dead-lettered through
                                   the default exchange back to ns.q
    ns.q.parked                    messages that failed max_attempts times, or were not
                                   events at all; kept for an operator

A failed message is copied into the delay queue of its attempt (the attempt count in the
``x-attempts`` header) and only then acked, so a crash in between duplicates it rather
than losing it. One delay queue per attempt, because RabbitMQ expires messages only at
the head of a queue: within one queue every message has the same TTL, so the head is
always the first due.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence, Sized
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelNotFoundEntity
from aiormq.exceptions import ChannelPreconditionFailed
from pamqp import commands as spec
from yarl import URL

from shared.bus.event import Event, MalformedEventError
from shared.bus.port import (
    ATTEMPTS_HEADER,
    DEFAULT_CLOSE_GRACE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PREFETCH,
    DEFAULT_RETRY_DELAYS,
    REQUEST_ID_HEADER,
    ROUTING_KEY_HEADER,
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

DEFAULT_TIMEOUT = 5.0
# Publishes wait for their confirms together: 100 in flight gave 4.6x the rate of one at a
# time against a local RabbitMQ; more adds little.
DEFAULT_MAX_IN_FLIGHT = 128
JSON = "application/json"
# Generous for a local delay queue name; probing stops at the first one missing.
MAX_RETRY_QUEUES_PROBED = 64


class RabbitBus:
    """The RabbitMQ adapter of ``MessageBus``; build it with ``RabbitBus.open``."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        namespace: str,
        *,
        call_timeout: float,
        max_in_flight: int,
    ) -> None:
        self._connection = connection
        # Confirm mode: publish returns once the broker has the message (persisted,
        # for a durable queue), which is what the outbox relay relies on.
        self._channel = channel
        self._exchange = exchange
        self._namespace = namespace
        self._timeout = call_timeout
        self._max_in_flight = max_in_flight
        self._subscriptions: set[RabbitSubscription] = set()
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        namespace: str,
        *,
        call_timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> RabbitBus:
        """Connect and declare the exchange; ``BusUnavailableError`` if the broker is down.

        ``call_timeout`` bounds every call that waits for the broker (connecting, publishing,
        declaring), including while the connection is being re-established.
        """
        check_name("namespace", namespace)
        connection = aio_pika.RobustConnection(
            URL(url), client_properties={"connection_name": f"vod:{namespace}"}
        )
        try:
            async with asyncio.timeout(call_timeout):
                await connection.connect(timeout=call_timeout)
                channel = connection.channel(publisher_confirms=True)
                await channel.initialize()
                exchange = await channel.declare_exchange(
                    f"{namespace}.events", aio_pika.ExchangeType.TOPIC, durable=True
                )
        except ChannelPreconditionFailed as exc:
            await connection.close()
            raise BusTopologyError(str(exc)) from None
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            await connection.close()
            # Never the URL: it holds the password.
            raise BusUnavailableError(
                f"message broker unreachable: {type(exc).__name__}: {exc}"
            ) from None
        return cls(
            connection,
            channel,
            exchange,
            namespace,
            call_timeout=call_timeout,
            max_in_flight=max_in_flight,
        )

    @property
    def namespace(self) -> str:
        return self._namespace

    @asynccontextmanager
    async def _broker_call(self, what: str) -> AsyncIterator[None]:
        """Bound a broker round trip in time and translate the client's errors."""
        if self._closed:
            raise BusUnavailableError(f"{what}: the message bus is closed")
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except TimeoutError:
            raise BusUnavailableError(
                f"{what}: no answer from the message broker within {self._timeout:g}s"
            ) from None
        except ChannelPreconditionFailed as exc:
            raise BusTopologyError(f"{what}: {exc}") from None
        except CONNECTION_EXCEPTIONS as exc:
            raise BusUnavailableError(f"{what}: {type(exc).__name__}: {exc}") from None

    @asynccontextmanager
    async def _raw_channel(self) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        """A short-lived plain channel for one-off calls.

        Not a robust channel: a passive declare of a missing queue makes the broker
        close the channel, and a robust one would reopen it behind our back.
        """
        await self._connection.ready()
        transport = self._connection.transport
        if transport is None:
            raise BusUnavailableError("the message broker connection is down")
        channel = await transport.connection.channel(publisher_confirms=False)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    async def publish(self, event: Event, *, headers: Mapping[str, str] | None = None) -> None:
        await self._publish_body(
            event.type, event.to_json(), headers, message_id=event.id, timestamp=event.occurred_at
        )

    async def publish_raw(
        self, routing_key: str, body: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        await self._publish_body(routing_key, bytes(body), headers)

    async def _publish_body(
        self,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        *,
        message_id: str | None = None,
        timestamp: datetime | None = None,
    ) -> None:
        message = aio_pika.Message(
            body,
            headers=_amqp_headers(outgoing_headers(headers, request_id_var.get())),
            content_type=JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            timestamp=timestamp,
            type=routing_key,
        )
        async with self._broker_call("publish"):
            # Not mandatory: an event nobody has bound a queue for is not an error.
            await self._exchange.publish(message, routing_key, mandatory=False)

    async def publish_many(
        self, events: Iterable[Event], *, headers: Mapping[str, str] | None = None
    ) -> None:
        pending = iter(events)

        async def worker() -> None:
            # The workers share one iterator: each takes the next event when its
            # previous confirm is in, so at most max_in_flight are unconfirmed.
            for event in pending:
                await self.publish(event, headers=headers)

        count = self._max_in_flight
        if isinstance(events, Sized):
            count = min(count, len(events))
        workers = [asyncio.create_task(worker()) for _ in range(count)]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if (exc := task.exception()) is not None:
                    raise exc
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def publish_to_queue(self, queue: str, message: aio_pika.Message) -> bool:
        """Put ``message`` straight into ``queue``; False if the queue does not exist."""
        async with self._broker_call("publish"):
            # Mandatory: a retry or parking queue that vanished must not eat the message.
            result = await self._channel.default_exchange.publish(message, queue, mandatory=True)
        return not isinstance(result, aiormq.abc.DeliveredMessage)

    async def declare_queue(
        self,
        queue: str,
        routing_keys: Sequence[str],
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    ) -> None:
        spec_ = QueueSpec.build(self._namespace, queue, routing_keys, max_attempts, retry_delays)
        async with self._broker_call("declare queue"):
            channel = self._connection.channel(publisher_confirms=False)
            try:
                await channel.initialize()
                await self.declare_topology(channel, spec_)
            finally:
                await asyncio.shield(_close_quietly(channel))

    async def declare_topology(self, channel: AbstractChannel, spec_: QueueSpec) -> AbstractQueue:
        main = await channel.declare_queue(spec_.main, durable=True)
        for name, delay in spec_.retry_queues:
            await channel.declare_queue(
                name,
                durable=True,
                arguments={
                    "x-message-ttl": round(delay * 1000),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": spec_.main,
                },
            )
        await channel.declare_queue(spec_.parked, durable=True)
        for key in spec_.routing_keys:
            await main.bind(self._exchange.name, key)
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
    ) -> RabbitSubscription:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        spec_ = QueueSpec.build(self._namespace, queue, routing_keys, max_attempts, retry_delays)
        if self._closed:
            raise BusUnavailableError("subscribe: the message bus is closed")
        # A channel per subscription: prefetch is a per-channel setting, and the robust
        # connection restores the channel's queues, bindings and consumer after an outage.
        channel = self._connection.channel(publisher_confirms=False)
        subscription = RabbitSubscription(
            self, spec_=spec_, channel=channel, handler=handler, on_outcome=on_outcome
        )
        try:
            async with self._broker_call("subscribe"):
                await channel.initialize()
                await channel.set_qos(prefetch_count=prefetch)
                main = await self.declare_topology(channel, spec_)
                await subscription.start(main)
        except BaseException:
            await asyncio.shield(_close_quietly(channel))
            raise
        self._subscriptions.add(subscription)
        return subscription

    def forget(self, subscription: RabbitSubscription) -> None:
        self._subscriptions.discard(subscription)

    async def parked(self, queue: str, *, limit: int = 100) -> list[Event]:
        messages = await self.parked_messages(queue, limit=limit)
        return [event for m in messages if (event := m.event) is not None]

    async def parked_messages(self, queue: str, *, limit: int = 100) -> list[ParkedMessage]:
        check_name("queue", queue)
        name = f"{self._namespace}.{queue}.parked"
        found: list[ParkedMessage] = []
        async with self._broker_call("peek parked"), self._raw_channel() as channel:
            try:
                await channel.queue_declare(name, passive=True)
            except ChannelNotFoundEntity:
                return []
            # Taken unacked and left unacked: closing the channel puts every one of
            # them back, in its place.
            while len(found) < limit:
                got = await channel.basic_get(name, no_ack=False)
                if isinstance(got.delivery, spec.Basic.GetEmpty):
                    break
                headers = _plain_headers(got.header.properties.headers or {})
                found.append(parked_message(got.body, headers, got.routing_key or ""))
        return found

    async def requeue_parked(self, queue: str, *, limit: int = 100) -> int:
        check_name("queue", queue)
        main = f"{self._namespace}.{queue}"
        moved = 0
        # One bounded broker call per message: a long requeue is not one long timeout.
        while moved < limit and await self._requeue_one(main):
            moved += 1
        return moved

    async def _requeue_one(self, main: str) -> bool:
        """Take the oldest parked message unacked, publish it to ``main`` with a confirm,
        and only then ack it; False when there is none (or no main queue to take it)."""
        async with self._broker_call("requeue parked"), self._raw_channel() as channel:
            try:
                await channel.queue_declare(f"{main}.parked", passive=True)
            except ChannelNotFoundEntity:
                return False
            got = await channel.basic_get(f"{main}.parked", no_ack=False)
            if not isinstance(got.delivery, spec.Basic.GetOk):
                return False
            tag = got.delivery.delivery_tag or 0
            properties = got.header.properties
            copy = aio_pika.Message(
                got.body,
                headers=_amqp_headers(requeued_headers(_plain_headers(properties.headers or {}))),
                content_type=properties.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=properties.message_id,
                timestamp=properties.timestamp,
                type=properties.message_type,
            )
            if not await self.publish_to_queue(main, copy):
                # No main queue (its consumer never ran here): leave the message parked.
                await channel.basic_reject(tag, requeue=True)
                return False
            await channel.basic_ack(tag)
        return True

    async def queue_stats(self, queue: str) -> QueueStats:
        check_name("queue", queue)
        main = f"{self._namespace}.{queue}"
        declared = await self._declared(main)
        if declared is None:
            return QueueStats(ready=0, retrying=0, parked=0, consumers=0)
        parked = await self._declared(f"{main}.parked")
        retrying = 0
        # As many delay queues as whoever declared the queue asked for: probe until one
        # is missing.
        for index in range(1, MAX_RETRY_QUEUES_PROBED + 1):
            retry = await self._declared(f"{main}.retry.{index}")
            if retry is None:
                break
            retrying += retry.message_count or 0
        return QueueStats(
            ready=declared.message_count or 0,
            retrying=retrying,
            parked=0 if parked is None else parked.message_count or 0,
            consumers=declared.consumer_count or 0,
        )

    async def _declared(self, name: str) -> spec.Queue.DeclareOk | None:
        """A passive declare of the full queue name ``name``; None if it does not exist."""
        async with self._broker_call("queue stats"), self._raw_channel() as channel:
            try:
                return await channel.queue_declare(name, passive=True)
            except ChannelNotFoundEntity:
                return None

    async def queue_depth(self, queue: str) -> int:
        check_name("queue", queue)
        async with self._broker_call("queue depth"), self._raw_channel() as channel:
            try:
                declared = await channel.queue_declare(f"{self._namespace}.{queue}", passive=True)
            except ChannelNotFoundEntity:
                return 0
        return declared.message_count or 0

    async def ping(self) -> None:
        async with self._broker_call("ping"), self._raw_channel():
            pass

    async def delete_namespace(self, queues: Iterable[str]) -> None:
        names: list[str] = []
        for queue in queues:
            check_name("queue", queue)
            main = f"{self._namespace}.{queue}"
            names += [main, f"{main}.parked"]
            # How many delay queues there are depends on who declared them: count
            # them by probing until one is missing.
            for index in range(1, MAX_RETRY_QUEUES_PROBED + 1):
                retry = f"{main}.retry.{index}"
                if not await self._exists(retry):
                    break
                names.append(retry)
        async with self._broker_call("delete namespace"), self._raw_channel() as channel:
            for name in names:
                await channel.queue_delete(name)
            await channel.exchange_delete(self._exchange.name)

    async def _exists(self, queue: str) -> bool:
        async with self._broker_call("probe queue"), self._raw_channel() as channel:
            try:
                await channel.queue_declare(queue, passive=True)
            except ChannelNotFoundEntity:
                return False
        return True

    async def close(self, *, grace: float | None = DEFAULT_CLOSE_GRACE) -> None:
        if self._closed:
            return
        await asyncio.gather(*(s.close(grace=grace) for s in list(self._subscriptions)))
        self._closed = True
        await self._connection.close()


class _Acks:
    """Acks a subscription's finished messages in as few frames as it safely can.

    A message whose every earlier delivery on its channel is already settled joins the
    next ``basic.ack`` with ``multiple``: a batch of 500 that finishes together (the
    danmaku consumer's) costs one frame instead of 500, a fifth of the consumer's CPU
    per message. Any other message is acked on its own at once, so a slow message never
    holds the prefetch window of those after it. Frames go out one flush at a time, in
    order: a ``multiple`` ack must never cover a tag already acked (the broker would
    close the channel), nor one still in flight (it would be lost). Settling returns once
    the frame is written, as ``message.ack()`` does.
    """

    def __init__(self) -> None:
        self._channel: object | None = None
        # Delivery tags of the current channel not yet settled, in delivery order.
        self._unsettled: dict[int, None] = {}
        self._joined: AbstractIncomingMessage | None = None
        self._joined_written: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    def received(self, message: AbstractIncomingMessage) -> None:
        channel = _channel_of(message)
        if channel is not self._channel:
            # A reopened channel numbers its deliveries afresh; what was unsettled on the
            # old one went back to the queue with it.
            self._channel = channel
            self._unsettled = {}
        if message.delivery_tag is not None:
            self._unsettled[message.delivery_tag] = None

    def settled(self, message: AbstractIncomingMessage) -> None:
        """``message`` was settled on its own (acked, nacked): it no longer blocks a join."""
        if _channel_of(message) is self._channel and message.delivery_tag is not None:
            self._unsettled.pop(message.delivery_tag, None)

    async def ack(self, message: AbstractIncomingMessage) -> None:
        tag = message.delivery_tag
        channel = _channel_of(message)
        if tag is None or channel is None or channel is not self._channel:
            await _settle_quietly(message.ack())
            return
        if next(iter(self._unsettled), None) != tag:
            await _settle_quietly(message.ack())
            self.settled(message)
            return
        del self._unsettled[tag]
        self._joined = message  # the front only moves up: this is the highest joined
        if self._joined_written is None:
            self._joined_written = asyncio.get_running_loop().create_future()
        written = self._joined_written
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        # Shielded: a handler cancelled while it waits must not cancel its batch-mates'.
        await asyncio.shield(written)

    async def _flush(self) -> None:
        try:
            while self._joined is not None and self._joined_written is not None:
                message, written = self._joined, self._joined_written
                self._joined = self._joined_written = None
                try:
                    await _settle_quietly(message.ack(multiple=True))
                finally:
                    if not written.done():
                        written.set_result(None)
        finally:
            self._flusher = None


def _channel_of(message: AbstractIncomingMessage) -> object | None:
    """The AMQP channel ``message`` came on, None once that channel is closed."""
    try:
        return message.channel
    except CONNECTION_EXCEPTIONS:
        return None


class RabbitSubscription:
    """One consumer on its own channel; prefetch unacked messages are handled at once."""

    def __init__(
        self,
        bus: RabbitBus,
        *,
        spec_: QueueSpec,
        channel: AbstractChannel,
        handler: Handler,
        on_outcome: Callable[[Outcome], None] | None,
    ) -> None:
        self._bus = bus
        self._spec = spec_
        self._channel = channel
        self._handler = handler
        self._on_outcome = on_outcome
        self._amqp_queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._acks = _Acks()

    @property
    def queue(self) -> str:
        return self._spec.queue

    async def start(self, main: AbstractQueue) -> None:
        self._amqp_queue = main
        self._consumer_tag = await main.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._closing:
            # Arrived between our cancel and the broker's cancel-ok.
            await _settle_quietly(message.nack(requeue=True))
            return
        self._acks.received(message)
        # A fresh context, so the handler sees the request id of this message only.
        task = asyncio.get_running_loop().create_task(
            self._process(message),
            name=f"bus:{self._spec.main}",
            context=contextvars.Context(),
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        headers = _plain_headers(message.headers)
        failures = attempts_of(headers)
        # A retried or requeued message arrives through the default exchange, under the
        # queue's name: the key it was published with travels in a header.
        routing_key = str(headers.get(ROUTING_KEY_HEADER) or message.routing_key or "")
        request_id = headers.get(REQUEST_ID_HEADER)
        request_id_var.set(request_id if isinstance(request_id, str) else None)
        try:
            event = Event.from_json(message.body)
        except MalformedEventError as exc:
            logger.error(  # noqa: TRY400 -- the reason is the message; no traceback to show
                "bus: malformed message on %s parked: %s", self._spec.main, exc
            )
            await self._park(message, headers, f"malformed event: {exc}", failures)
            self._report(routing_key, None, "parked", failures + 1, str(exc))
            return
        try:
            await self._handler(event)
        except asyncio.CancelledError:
            # Cancelled by close(): unacked, so the channel's closing returns it.
            self._report(routing_key, event.id, "requeued", failures + 1, None)
            raise
        # Whatever a handler raises is this message's failure; _fail logs it with its
        # traceback.
        except Exception as exc:  # noqa: BLE001
            await self._fail(message, headers, event, failures + 1, exc)
            return
        await self._acks.ack(message)
        self._report(routing_key, event.id, "acked", failures + 1, None)

    async def _fail(
        self,
        message: AbstractIncomingMessage,
        headers: Headers,
        event: Event,
        failures: int,
        exc: Exception,
    ) -> None:
        error = describe(exc)
        routing_key = str(headers.get(ROUTING_KEY_HEADER) or message.routing_key or "")
        step = next_step_after(self._spec, failures, exc)
        if step is None:
            logger.error(
                "bus: %s %s failed %d times, parked",
                self._spec.main,
                event.id,
                failures,
                exc_info=exc,
            )
            await self._park(message, headers, error, failures)
            self._report(routing_key, event.id, "parked", failures, error)
            return
        retry_queue, delay = step
        logger.warning(
            "bus: %s %s failed (attempt %d), retry in %.3gs",
            self._spec.main,
            event.id,
            failures,
            delay,
            exc_info=exc,
        )
        retry_headers = dict(headers)
        retry_headers[ATTEMPTS_HEADER] = failures
        retry_headers.setdefault(ROUTING_KEY_HEADER, routing_key)
        if await self._move(message, retry_queue, retry_headers):
            self._report(routing_key, event.id, "retried", failures, error)

    async def _park(
        self, message: AbstractIncomingMessage, headers: Headers, error: str, attempts: int
    ) -> None:
        parked = parked_headers(
            headers, routing_key=message.routing_key or "", error=error, attempts=attempts
        )
        await self._move(message, self._spec.parked, parked)

    async def _move(self, message: AbstractIncomingMessage, queue: str, headers: Headers) -> bool:
        """Copy ``message`` into ``queue``, then ack it; on failure give it back instead."""
        copy = aio_pika.Message(
            message.body,
            headers=_amqp_headers(headers),
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=message.timestamp,
            type=message.type,
        )
        try:
            moved = await self._bus.publish_to_queue(queue, copy)
            if not moved:
                # Someone deleted our queue: declare the topology again, once.
                await self._bus.declare_topology(self._channel, self._spec)
                moved = await self._bus.publish_to_queue(queue, copy)
        except (BusUnavailableError, BusTopologyError, *CONNECTION_EXCEPTIONS):
            logger.exception("bus: could not move a message to %s; returned to its queue", queue)
            moved = False
        if moved:
            await _settle_quietly(message.ack())
        else:
            await _settle_quietly(message.nack(requeue=True))
        self._acks.settled(message)
        return moved

    def _report(
        self,
        routing_key: str,
        event_id: str | None,
        result: OutcomeResult,
        attempt: int,
        error: str | None,
    ) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(
                Outcome(self._spec.queue, routing_key, event_id, result, attempt, error)
            )
        except Exception:
            logger.exception("bus: on_outcome callback of %s failed", self._spec.main)

    async def close(self, *, grace: float | None = DEFAULT_CLOSE_GRACE) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            if self._amqp_queue is not None and self._consumer_tag is not None:
                # Stop deliveries first; what is already here is still ours to finish.
                try:
                    async with asyncio.timeout(DEFAULT_TIMEOUT):
                        await self._amqp_queue.cancel(self._consumer_tag)
                except (TimeoutError, *CONNECTION_EXCEPTIONS):
                    logger.warning("bus: could not cancel the consumer of %s", self._spec.main)
            pending = set(self._tasks)
            if pending:
                _, late = await asyncio.wait(pending, timeout=grace)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        finally:
            # Whatever is still unacked goes back to the queue with the channel.
            await _close_quietly(self._channel)
            self._bus.forget(self)


async def _settle_quietly(settle: Any) -> None:
    """Ack or nack; if the channel is gone the broker requeues the message anyway."""
    try:
        await settle
    except CONNECTION_EXCEPTIONS as exc:
        logger.warning("bus: could not settle a message: %s", describe(exc))


async def _close_quietly(channel: AbstractChannel) -> None:
    try:
        if not channel.is_closed:
            await channel.close()
    except CONNECTION_EXCEPTIONS as exc:
        logger.warning("bus: could not close a channel: %s", describe(exc))


def _amqp_headers(headers: Headers) -> HeadersType:
    return dict(headers)


def _plain_headers(raw: Mapping[str, Any]) -> Headers:
    """AMQP field values as str or int; bytes decoded, anything else as its text."""
    plain: Headers = {}
    for key, value in raw.items():
        if isinstance(value, bool):
            plain[key] = int(value)
        elif isinstance(value, int | str):
            plain[key] = value
        elif isinstance(value, bytes | bytearray):
            plain[key] = bytes(value).decode("utf-8", "replace")
        else:
            plain[key] = str(value)
    return plain
