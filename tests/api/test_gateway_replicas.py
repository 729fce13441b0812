"""The gateway's replicas: failed ones sit out, idempotent requests move on, bodies never replay.

Time is a fake clock handed to the gateway (``HealthPolicy.clock``): cool-downs end when a
test moves it, never by waiting. Health-check rounds are run by the test, not a timer.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import UPSTREAM_CLIENT
from gateway.proxy.upstreams import HealthPolicy
from shared.web import METRICS, json_response
from tests.api.conftest import FakeUpstream, GatewayClient, GatewayFactory, Upstreams

COOLDOWN = 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> HealthPolicy:
    return HealthPolicy(cooldown=COOLDOWN, check_interval=None, clock=clock)


async def metric(client: GatewayClient, sample: str, **labels: str) -> float:
    """The value of one sample on the gateway's /metrics (0 when absent): its registry,
    which the operators' listener serves (tests/api/test_gateway.py)."""
    text = generate_latest(client.app[METRICS].registry).decode()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0


async def who_answers(client: GatewayClient, count: int, method: str = "GET") -> list[str]:
    answers = []
    for _ in range(count):
        response = await client.request(
            method, "/api/v1/videos", json={} if method == "POST" else None
        )
        assert response.status == 200
        answers.append((await response.json())["upstream"])
    return answers


async def two_api_replicas(upstreams: Upstreams) -> tuple[FakeUpstream, FakeUpstream]:
    return await two_api_replicas_with(upstreams, FakeUpstream("api-2"))


async def two_api_replicas_with(
    upstreams: Upstreams, second: FakeUpstream
) -> tuple[FakeUpstream, FakeUpstream]:
    return await upstreams.start(upstreams.api), await upstreams.start(second)


async def stop(fake: FakeUpstream) -> int:
    """Stops ``fake``'s server (its port then refuses connections); returns the port."""
    port = fake.port
    assert fake.server is not None
    await fake.server.close()
    return port


async def test_a_dead_replica_sits_out_its_cooldown(
    gateway: GatewayFactory, upstreams: Upstreams, clock: FakeClock, health: HealthPolicy
) -> None:
    first, second = await two_api_replicas(upstreams)
    client = await gateway(health=health, VOD_API_URL=f"{first.url},{second.url}")
    port = await stop(first)

    # Every request succeeds, POSTs too: a refused connection sent nothing.
    assert await who_answers(client, 4) == ["api-2"] * 4
    assert await who_answers(client, 2, "POST") == ["api-2"] * 2
    # The dead replica was tried once; after that it sat out.
    assert await metric(client, "vod_gateway_upstream_errors_total", replica="0") == 1
    assert await metric(client, "vod_gateway_upstream_retries_total", service="api") == 1
    assert await metric(client, "vod_gateway_upstream_replica_up", service="api", replica="0") == 0

    # Back on its port, it is still left alone until its cool-down ends...
    revived = await upstreams.start(FakeUpstream("api-revived"), port=port)
    clock.advance(COOLDOWN - 1)
    assert await who_answers(client, 4) == ["api-2"] * 4
    assert revived.seen == []

    # ...and then shares the load again.
    clock.advance(1)
    assert await metric(client, "vod_gateway_upstream_replica_up", service="api", replica="0") == 1
    assert sorted(await who_answers(client, 4)) == ["api-2", "api-2", "api-revived", "api-revived"]


async def test_when_every_replica_is_out_they_are_still_tried(
    gateway: GatewayFactory, upstreams: Upstreams, health: HealthPolicy
) -> None:
    first, second = await two_api_replicas(upstreams)
    client = await gateway(health=health, VOD_API_URL=f"{first.url},{second.url}")
    await stop(first)
    port = await stop(second)
    assert (await client.get("/api/v1/videos")).status == 502
    assert await metric(client, "vod_gateway_upstream_replica_up", service="api", replica="1") == 0

    # Both are out and no cool-down has ended, yet the one that is back answers.
    await upstreams.start(FakeUpstream("api-2-revived"), port=port)
    assert await who_answers(client, 1) == ["api-2-revived"]
    assert await metric(client, "vod_gateway_upstream_replica_up", service="api", replica="1") == 1


async def test_a_get_is_retried_on_another_replica_after_a_reset(
    gateway: GatewayFactory, upstreams: Upstreams, health: HealthPolicy
) -> None:
    resets = 0

    async def reset(request: web.Request) -> web.StreamResponse:
        nonlocal resets
        resets += 1
        assert request.transport is not None
        request.transport.abort()  # gone before a byte of the response
        return web.Response()

    upstreams.api.app.router.add_get("/api/v1/videos", reset)
    first, second = await two_api_replicas(upstreams)
    client = await gateway(health=health, VOD_API_URL=f"{first.url},{second.url}")

    # The rotation starts at the first replica, which resets the connection.
    assert await who_answers(client, 1) == ["api-2"]
    assert resets == 1
    assert await metric(client, "vod_gateway_upstream_errors_total", kind="disconnect") == 1
    assert await metric(client, "vod_gateway_upstream_retries_total", service="api") == 1
    # A reset is not a refusal: the replica stays in service.
    assert await metric(client, "vod_gateway_upstream_replica_up", service="api", replica="0") == 1


@pytest.mark.parametrize(
    "case",
    [
        ("POST", "/api/v1/users", b'{"username": "ann"}'),
        ("PUT", "/api/v1/uploads/u1/chunks/0", b"chunk bytes" * 10_000),  # idempotent, but read
        ("DELETE", "/api/v1/sessions", None),  # no body, but not safe to repeat
    ],
    ids=["POST", "PUT", "DELETE"],
)
async def test_a_request_that_may_have_been_acted_on_is_never_replayed(
    gateway: GatewayFactory,
    upstreams: Upstreams,
    health: HealthPolicy,
    case: tuple[str, str, bytes | None],
) -> None:
    method, path, body = case
    received: list[bytes] = []

    async def take_then_reset(request: web.Request) -> web.StreamResponse:
        received.append(await request.read())
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    upstreams.api.app.router.add_route(method, path, take_then_reset)
    upstreams.stream.app.router.add_route(method, path, take_then_reset)
    api_2 = FakeUpstream("api-2")
    stream_2 = FakeUpstream("stream-2")
    for fake in (upstreams.api, api_2, upstreams.stream, stream_2):
        await upstreams.start(fake)
    client = await gateway(
        health=health,
        VOD_API_URL=f"{upstreams.api.url},{api_2.url}",
        VOD_STREAM_URL=f"{upstreams.stream.url},{stream_2.url}",
    )

    response = await client.request(method, path, data=body)
    assert response.status == 502
    assert (await response.json(content_type=None))["code"] == "upstream_unavailable"
    assert received == [body or b""]  # the first replica had it all, once
    assert api_2.seen == stream_2.seen == []  # and no other replica got it again


async def test_failing_health_checks_take_a_replica_out_and_back(
    gateway: GatewayFactory, upstreams: Upstreams, health: HealthPolicy
) -> None:
    first, second = await two_api_replicas(upstreams)
    client = await gateway(health=health, VOD_API_URL=f"{first.url},{second.url}")
    assert client.app is not None
    upstream_client = client.app[UPSTREAM_CLIENT]

    first.healthy = False
    await upstream_client.check_replicas()
    assert await who_answers(client, 4) == ["api-2"] * 4
    assert first.seen == []
    assert (
        await metric(
            client, "vod_gateway_upstream_health_checks_total", replica="0", result="failed"
        )
        == 1
    )

    # Healthy again: back at the next check, without waiting for the cool-down.
    first.healthy = True
    await upstream_client.check_replicas()
    assert sorted(await who_answers(client, 4)) == ["api", "api", "api-2", "api-2"]


async def test_health_checks_run_from_the_start(
    gateway: GatewayFactory, upstreams: Upstreams, clock: FakeClock
) -> None:
    await upstreams.start(upstreams.scheduler)
    upstreams.scheduler.healthy = False
    # An hour between rounds: only the first, made at start, can be seen in this test.
    policy = HealthPolicy(cooldown=COOLDOWN, check_interval=3600, clock=clock)
    client = await gateway(health=policy)
    async with asyncio.timeout(5):  # a bound on a hang, not a wait for time to pass
        await upstreams.scheduler.probed.wait()
        # The probe was answered; its result is recorded as soon as the gateway reads it.
        # No event marks the recording: yield (never sleep) until the check task has run.
        while not await metric(client, "vod_gateway_upstream_health_checks_total", result="failed"):  # noqa: ASYNC110
            await asyncio.sleep(0)
    assert (
        await metric(client, "vod_gateway_upstream_replica_up", service="scheduler", replica="0")
        == 0
    )


async def test_a_lone_replica_gets_one_more_try_after_a_broken_connection(
    gateway: GatewayFactory, upstreams: Upstreams, health: HealthPolicy
) -> None:
    tries = 0

    async def flaky(request: web.Request) -> web.StreamResponse:
        nonlocal tries
        tries += 1
        if tries == 1:  # as a pooled connection the upstream had just closed would
            assert request.transport is not None
            request.transport.abort()
        return json_response({"upstream": "api"})

    upstreams.api.app.router.add_get("/api/v1/videos", flaky)
    client = await gateway(health=health)
    assert await who_answers(client, 1) == ["api"]
    assert tries == 2


async def test_a_lone_refusing_replica_is_tried_once_per_request(
    gateway: GatewayFactory, upstreams: Upstreams, health: HealthPolicy
) -> None:
    client = await gateway(health=health)
    await stop(upstreams.api)
    for count in (1, 2):
        assert (await client.get("/api/v1/videos")).status == 502
        assert await metric(client, "vod_gateway_upstream_errors_total", kind="connect") == count


async def test_a_websocket_goes_to_a_replica_that_answers(
    gateway: GatewayFactory, upstreams: Upstreams, health: HealthPolicy
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str("echo " + message.data)
        return ws

    second = FakeUpstream("api-2")
    second.app.router.add_get("/api/v1/videos/{id}/live", echo)
    first, second = await two_api_replicas_with(upstreams, second)
    client = await gateway(health=health, VOD_API_URL=f"{first.url},{second.url}")
    await stop(first)
    async with client.ws_connect("/api/v1/videos/v1/live") as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "echo hi"
    assert await metric(client, "vod_gateway_upstream_replica_up", service="api", replica="0") == 0
