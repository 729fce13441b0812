"""The replicas of each upstream service: which are in service, and the order to try them.

A replica is *out* for a cool-down after it failed: its connection was refused or timed
out (seen by a request), or its ``/healthz`` failed (seen by the periodic check). While
out it is skipped, as long as another replica is in service; when every replica is out,
they are all still tried, soonest back first, rather than refused without trying. A
replica comes back when its cool-down ends, or at once when it answers a request or a
health check.

Time comes from an injectable clock (``time.monotonic`` by default), so tests move it
instead of waiting for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.proxy.table import SERVICES, Service
from shared.settings import Settings

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

DEFAULT_COOLDOWN = 10.0
DEFAULT_CHECK_INTERVAL = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthPolicy:
    """How the gateway judges its upstream replicas.

    ``cooldown``: seconds a failed replica sits out. ``check_interval``: seconds between
    rounds of ``/healthz`` probes of every replica (the first at start), None for none
    (requests still take failing replicas out). ``clock``: seconds, monotonic.
    """

    cooldown: float = DEFAULT_COOLDOWN
    check_interval: float | None = DEFAULT_CHECK_INTERVAL
    clock: Clock = time.monotonic


class Replica:
    """One replica's base URL and, while it is out, until when."""

    __slots__ = ("label", "out_until", "url")

    def __init__(self, url: str, label: str) -> None:
        self.url = url
        # What metrics call it: its place in the configured list. The URL stays out of
        # /metrics, which may be scraped from outside; it is in the logs.
        self.label = label
        self.out_until = 0.0


class ReplicaSet:
    """The replicas of one service, handed out round-robin among those in service.

    ``rotation()`` returns every replica: first those in service, starting one further
    along on each call (the first is the one to use, the others the fallbacks), then those
    sitting out, soonest back first. Round-robin and health state are per gateway
    process; with several gateways the load still spreads evenly enough, and no
    coordination is needed.
    """

    __slots__ = ("_clock", "_cooldown", "_next", "replicas", "service")

    def __init__(
        self,
        service: Service,
        urls: tuple[str, ...],
        *,
        cooldown: float = DEFAULT_COOLDOWN,
        clock: Clock = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError(f"no replica URL for {service}")
        self.service = service
        self.replicas = tuple(Replica(url, str(index)) for index, url in enumerate(urls))
        self._cooldown = cooldown
        self._clock = clock
        self._next = 0

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(replica.url for replica in self.replicas)

    def rotation(self) -> tuple[Replica, ...]:
        now = self._clock()
        replicas = self.replicas
        if all(replica.out_until <= now for replica in replicas):  # the usual case
            start = self._next % len(replicas)
            self._next += 1
            return replicas[start:] + replicas[:start]
        serving = [replica for replica in self.replicas if replica.out_until <= now]
        resting = sorted(
            (replica for replica in self.replicas if replica.out_until > now),
            key=lambda replica: replica.out_until,
        )
        if serving:
            start = self._next % len(serving)
            self._next += 1
            serving = serving[start:] + serving[:start]
        return (*serving, *resting)

    def is_up(self, replica: Replica) -> bool:
        return replica.out_until <= self._clock()

    def mark_out(self, replica: Replica, reason: str) -> None:
        was_up = self.is_up(replica)
        replica.out_until = self._clock() + self._cooldown
        if was_up:
            logger.warning(
                "replica %s of %s is out for %.0f s: %s",
                replica.url,
                self.service,
                self._cooldown,
                reason,
            )

    def mark_up(self, replica: Replica) -> None:
        if not self.is_up(replica):
            logger.info("replica %s of %s is back in service", replica.url, self.service)
        replica.out_until = 0.0


Upstreams = Mapping[Service, ReplicaSet]


def upstreams_from_settings(
    settings: Settings, health: HealthPolicy | None = None
) -> dict[Service, ReplicaSet]:
    policy = health or HealthPolicy()
    return {
        service: ReplicaSet(
            service, settings.upstream_urls(service), cooldown=policy.cooldown, clock=policy.clock
        )
        for service in SERVICES
    }
