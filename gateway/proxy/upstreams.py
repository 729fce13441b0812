"""The replicas of each upstream service and the order in which to try them."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.proxy.table import SERVICES, Service
from shared.settings import Settings


class ReplicaSet:
    """The base URLs of one service's replicas, handed out round-robin.

    ``rotation()`` returns every replica, starting one further along on each call: the
    first is the one to use, the others are the fallbacks when it refuses the connection.
    Round-robin state is per gateway process; with several gateways the load still
    spreads evenly enough, and no coordination is needed.
    """

    __slots__ = ("_next", "service", "urls")

    def __init__(self, service: Service, urls: tuple[str, ...]) -> None:
        if not urls:
            raise ValueError(f"no replica URL for {service}")
        self.service = service
        self.urls = urls
        self._next = 0

    def rotation(self) -> tuple[str, ...]:
        start = self._next
        self._next = (start + 1) % len(self.urls)
        return self.urls[start:] + self.urls[:start]


Upstreams = Mapping[Service, ReplicaSet]


def upstreams_from_settings(settings: Settings) -> dict[Service, ReplicaSet]:
    return {service: ReplicaSet(service, settings.upstream_urls(service)) for service in SERVICES}
