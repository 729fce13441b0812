"""The scheduler's consumers, one durable queue each.

``CONSUMERS`` lists the registrar of every consumer the scheduler runs; a new consumer
is a module here with a ``register(group, backends)`` function, added to the tuple. The
framework (idempotence, permanent failures, metrics) is in ``base``.
"""

from __future__ import annotations

from scheduler_service.consumers import danmaku, deletions, media
from scheduler_service.consumers.base import ConsumerRegistrar

CONSUMERS: tuple[ConsumerRegistrar, ...] = (
    deletions.register,
    media.register,
    danmaku.register,
)
