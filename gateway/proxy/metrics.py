"""What the gateway tells Prometheus about its upstreams, on the app's own registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.proxy.upstreams import Replica, ReplicaSet


class UpstreamMetrics:
    """Upstream failures, retries and replica state.

    ``kind`` of an error: ``connect`` (refused or unreachable), ``connect_timeout``,
    ``disconnect`` (the connection broke before the response), ``timeout`` (no response
    in time), ``error`` (anything else before the response). ``replica`` is the replica's
    place in its service's URL list, never its address.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.errors = Counter(
            "vod_gateway_upstream_errors_total",
            "Attempts to reach an upstream replica that got no response, by kind",
            ["service", "replica", "kind"],
            registry=registry,
        )
        self.retries = Counter(
            "vod_gateway_upstream_retries_total",
            "Requests sent to another replica after an attempt failed",
            ["service"],
            registry=registry,
        )
        self.health_checks = Counter(
            "vod_gateway_upstream_health_checks_total",
            "/healthz probes of upstream replicas (periodic and /readyz), by result",
            ["service", "replica", "result"],
            registry=registry,
        )
        self._replica_up = Gauge(
            "vod_gateway_upstream_replica_up",
            "1 while a replica is in service, 0 while it sits out a cool-down",
            ["service", "replica"],
            registry=registry,
        )

    def watch(self, replica_sets: Iterable[ReplicaSet]) -> None:
        """Reports each replica's state as it is when scraped (cool-downs end unseen)."""
        for replica_set in replica_sets:
            for replica in replica_set.replicas:
                gauge = self._replica_up.labels(replica_set.service, replica.label)
                gauge.set_function(_state_of(replica_set, replica))


def _state_of(replica_set: ReplicaSet, replica: Replica) -> Callable[[], float]:
    return lambda: 1.0 if replica_set.is_up(replica) else 0.0
