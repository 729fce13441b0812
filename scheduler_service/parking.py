"""Requeue parked messages: move them from ``<queue>.parked`` back to ``<queue>``.

The bus port can list parked messages but not take them, so this reaches into the two
adapters; it belongs in ``shared.bus`` as ``MessageBus.requeue_parked`` and should move
there (then this module becomes one call). A requeued message starts again with a full
set of attempts: its attempt count, error and parking time are dropped; its body, request
id and original routing key are kept.

RabbitMQ: each message is taken unacked, published to the main queue with a publisher
confirm, and only then acked; a crash in between leaves it in both places, which the
consumers' deduplication on the event id absorbs.
"""

from __future__ import annotations

import aio_pika
from pamqp import commands as amqp

from shared.bus import MemoryBus, MessageBus, RabbitBus
from shared.bus.port import ATTEMPTS_HEADER, ERROR_HEADER, PARKED_AT_HEADER, check_name
from shared.bus.rabbit import _plain_headers

DROPPED_HEADERS = (ATTEMPTS_HEADER, ERROR_HEADER, PARKED_AT_HEADER)


async def requeue_parked(bus: MessageBus, queue: str, *, limit: int = 100) -> int:
    """Move up to ``limit`` parked messages of ``queue`` back to it, oldest first."""
    check_name("queue", queue)
    if isinstance(bus, RabbitBus):
        return await _requeue_rabbit(bus, queue, limit)
    if isinstance(bus, MemoryBus):
        return _requeue_memory(bus, queue, limit)
    raise TypeError(f"cannot requeue on {type(bus).__name__}")


def _requeue_memory(bus: MemoryBus, queue: str, limit: int) -> int:
    main_name = f"{bus.namespace}.{queue}"
    parked = bus.broker.queues.get(f"{main_name}.parked")
    main = bus.broker.queues.get(main_name)
    if parked is None or main is None:
        return 0
    moved = 0
    while parked.ready and moved < limit:
        message = parked.ready.popleft()
        for header in DROPPED_HEADERS:
            message.headers.pop(header, None)
        main.put(message)
        moved += 1
    return moved


async def _requeue_rabbit(bus: RabbitBus, queue: str, limit: int) -> int:
    main_name = f"{bus.namespace}.{queue}"
    parked_name = f"{main_name}.parked"
    moved = 0
    # One bounded broker call per message: a long requeue is not one long timeout.
    while moved < limit:
        async with bus._broker_call("requeue parked"), bus._raw_channel() as channel:
            try:
                await channel.queue_declare(parked_name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return moved
            got = await channel.basic_get(parked_name, no_ack=False)
            if not isinstance(got.delivery, amqp.Basic.GetOk):
                return moved
            tag = got.delivery.delivery_tag or 0
            properties = got.header.properties
            headers = {
                key: value
                for key, value in _plain_headers(properties.headers or {}).items()
                if key not in DROPPED_HEADERS
            }
            copy = aio_pika.Message(
                got.body,
                headers=dict(headers),
                content_type=properties.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                timestamp=properties.timestamp,
                type=properties.message_type,
            )
            if not await bus.publish_to_queue(main_name, copy):
                # No main queue (its consumer never ran here): leave the message parked.
                await channel.basic_reject(tag, requeue=True)
                return moved
            await channel.basic_ack(tag)
        moved += 1
    return moved
