"""The message-bus port: events published to a topic exchange, consumed from durable queues.

    bus = await open_bus(settings.amqp_url, settings.namespace)
    await bus.publish(Event.new("video.deleted", {"video_id": video_id}))
    subscription = await bus.subscribe("video-deletions", ["video.deleted"], handle)
    ...
    await subscription.close()
    await bus.close()

Delivery is at least once: a handler that returns acks its message, one that raises has
it delivered again after a growing delay, and after ``max_attempts`` failures (at once,
for ``PermanentError``) it waits in the queue's parking queue for an operator. Handlers
must therefore be idempotent (deduplicate on ``Event.id``). ``amqp://`` and ``amqps://``
URLs give ``RabbitBus``; ``memory://NAME`` gives ``MemoryBus``, with the same semantics
inside one process.

Errors::

    ServiceUnavailableError (shared.errors, 503)
    └── BusUnavailableError    the broker is down or the bus closed; raised in bounded time
    BusTopologyError           a queue exists with other arguments (a deployment problem)
    PermanentError             raised by a handler: park this message now, do not retry
    ValueError
    └── MalformedEventError    a body that is not an event (consumers park it)
"""

from __future__ import annotations

from urllib.parse import urlsplit

from shared.bus.event import Event, MalformedEventError
from shared.bus.memory import MemoryBus, MemorySubscription
from shared.bus.port import (
    ATTEMPTS_HEADER,
    ERROR_HEADER,
    REQUEST_ID_HEADER,
    BusTopologyError,
    BusUnavailableError,
    Handler,
    MessageBus,
    Outcome,
    ParkedMessage,
    PermanentError,
    QueueStats,
    Subscription,
)
from shared.bus.rabbit import DEFAULT_TIMEOUT, RabbitBus, RabbitSubscription

__all__ = [
    "ATTEMPTS_HEADER",
    "ERROR_HEADER",
    "REQUEST_ID_HEADER",
    "BusTopologyError",
    "BusUnavailableError",
    "Event",
    "Handler",
    "MalformedEventError",
    "MemoryBus",
    "MemorySubscription",
    "MessageBus",
    "Outcome",
    "ParkedMessage",
    "PermanentError",
    "QueueStats",
    "RabbitBus",
    "RabbitSubscription",
    "Subscription",
    "open_bus",
]


async def open_bus(
    url: str, namespace: str, *, call_timeout: float = DEFAULT_TIMEOUT
) -> MessageBus:
    """The adapter ``url`` names, connected and with its exchange declared.

    ``call_timeout`` bounds each wait for RabbitMQ (ignored by the in-process bus). Raises
    ``BusUnavailableError`` when the broker cannot be reached, ``ValueError`` for a URL
    of another scheme.
    """
    parts = urlsplit(url)
    if parts.scheme in ("amqp", "amqps"):
        return await RabbitBus.open(url, namespace, call_timeout=call_timeout)
    if parts.scheme == "memory":
        return MemoryBus.open((parts.netloc + parts.path).strip("/"), namespace)
    raise ValueError(f"unsupported message bus URL scheme {parts.scheme!r}")
