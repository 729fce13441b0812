"""The stream limiter: bounded, per client, never a queue, freed on any exit."""

from __future__ import annotations

import pytest

from shared.errors import RateLimitedError
from stream_service.streaming.limiter import StreamLimiter


def test_capacity_and_per_client_caps_refuse_at_once() -> None:
    refusals: list[None] = []
    limiter = StreamLimiter(capacity=2, per_client=1, on_refused=lambda: refusals.append(None))
    with limiter.slot("a"):
        with pytest.raises(RateLimitedError) as per_client, limiter.slot("a"):
            pass
        assert per_client.value.instance_code == "too_many_streams_per_client"
        with limiter.slot("b"):
            with pytest.raises(RateLimitedError) as full, limiter.slot("c"):
                pass
            assert full.value.instance_code == "too_many_streams"
            assert full.value.headers["Retry-After"] == "1"
    assert limiter.active == 0
    assert len(refusals) == 2


def test_a_failed_stream_frees_its_slot() -> None:
    limiter = StreamLimiter(capacity=1, per_client=1)
    with pytest.raises(ConnectionResetError), limiter.slot("a"):
        raise ConnectionResetError
    with limiter.slot("a"):
        assert limiter.active == 1
