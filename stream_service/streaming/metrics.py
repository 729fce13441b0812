"""Streaming's Prometheus series (DESIGN: bytes streamed, active streams, refusals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class StreamMetrics:
    """Streaming's series on the service's registry (DESIGN: bytes, active, refusals)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes_sent = Counter(
            "vod_stream_bytes_total", "Video bytes sent to clients", registry=registry
        )
        self.refused = Counter(
            "vod_stream_refused_total",
            "Streams refused by the connection limiter",
            registry=registry,
        )
        self.active = Gauge("vod_stream_active", "Streams being sent now", registry=registry)
