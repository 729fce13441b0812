"""CORS at the gateway: preflights answered there, headers on every /api/v1 response."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.cors import ALLOWED_REQUEST_HEADERS, EXPOSED_RESPONSE_HEADERS
from shared.errors import ConfigError
from shared.settings import Settings
from tests.api.conftest import GatewayFactory, Upstreams
from tests.clients import Publisher
from tests.problems import problem
from tests.stack import start_stack

FRONT_END = "https://player.example.com"
OTHER = "https://evil.example.net"
ORIGINS = f"{FRONT_END}, http://localhost:5173"


def tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",") if token.strip()}


def vary(response: aiohttp.ClientResponse) -> set[str]:
    return {t for value in response.headers.getall("Vary", ()) for t in tokens(value)}


def preflight_headers(origin: str, method: str = "GET", headers: str = "range") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


@pytest.mark.parametrize(
    ("method", "path", "requested"),
    [
        ("GET", "/api/v1/videos/v1/stream", "range, if-range"),
        ("PUT", "/api/v1/uploads/u1/chunks/0", "authorization, content-type, x-chunk-sha256"),
        ("PATCH", "/api/v1/tus/abc", "tus-resumable, upload-offset, content-type"),
        ("DELETE", "/api/v1/videos/v1", "authorization"),
        ("GET", "/api/v1/no/such/route", "authorization"),
    ],
)
async def test_preflight_is_answered_by_the_gateway(
    gateway: GatewayFactory, upstreams: Upstreams, method: str, path: str, requested: str
) -> None:
    client = await gateway(VOD_CORS_ORIGINS=ORIGINS)
    response = await client.options(path, headers=preflight_headers(FRONT_END, method, requested))
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == FRONT_END
    assert method.lower() in tokens(response.headers["Access-Control-Allow-Methods"])
    assert tokens(requested) <= tokens(response.headers["Access-Control-Allow-Headers"])
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert {"origin", "access-control-request-method"} <= vary(response)
    assert response.headers["X-Request-ID"]
    # Nothing went upstream: a preflight is the gateway's to answer.
    assert not upstreams.api.seen
    assert not upstreams.stream.seen


async def test_every_header_a_front_end_needs_is_allowed_and_exposed(
    gateway: GatewayFactory,
) -> None:
    client = await gateway(VOD_CORS_ORIGINS=ORIGINS)
    response = await client.options(
        "/api/v1/uploads", headers=preflight_headers("http://localhost:5173", "POST")
    )
    allowed = tokens(response.headers["Access-Control-Allow-Headers"])
    assert {
        "authorization",
        "range",
        "content-type",
        "x-chunk-sha256",
        "if-range",
        "tus-resumable",
        "upload-length",
        "upload-offset",
        "upload-metadata",
        "upload-checksum",
    } <= allowed
    assert tokens(", ".join(ALLOWED_REQUEST_HEADERS)) == allowed
    assert {"content-range", "content-length", "accept-ranges", "etag", "x-request-id"} <= tokens(
        ", ".join(EXPOSED_RESPONSE_HEADERS)
    )


async def test_a_preflight_from_another_origin_is_refused(
    gateway: GatewayFactory, upstreams: Upstreams
) -> None:
    client = await gateway(VOD_CORS_ORIGINS=ORIGINS)
    response = await client.options("/api/v1/videos/v1/stream", headers=preflight_headers(OTHER))
    await problem(response, 403, "cors_origin_not_allowed")
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    assert "origin" in vary(response)
    assert not upstreams.stream.seen


async def test_without_origins_cors_is_off(gateway: GatewayFactory, upstreams: Upstreams) -> None:
    client = await gateway()
    response = await client.options(
        "/api/v1/videos/v1/stream", headers=preflight_headers(FRONT_END)
    )
    await problem(response, 403, "cors_origin_not_allowed")
    response = await client.get("/api/v1/videos", headers={"Origin": FRONT_END})
    assert response.status == 200
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    assert "origin" not in vary(response)
    # An OPTIONS that is not a preflight is an ordinary request, relayed as before.
    response = await client.options("/api/v1/videos")
    assert response.status == 200
    assert [seen.method for seen in upstreams.api.seen] == ["GET", "OPTIONS"]


# A short body is relayed whole, a long one streamed (gateway.proxy.forward): both paths.
RELAYED_BODIES = pytest.mark.parametrize(
    "body", [b"0123456789", bytes(range(256)) * 1024], ids=["whole", "streamed"]
)


def serve_with_upstream_cors(body: bytes) -> Callable[[web.Request], Any]:
    async def serve(_request: web.Request) -> web.Response:
        return web.Response(
            status=206,
            body=body,
            headers={
                "Content-Range": f"bytes 0-{len(body) - 1}/{len(body) * 2}",
                "ETag": '"abc"',
                "Vary": "Accept-Encoding",
                # An upstream must not widen the policy.
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Credentials": "true",
            },
        )

    return serve


@RELAYED_BODIES
async def test_proxied_responses_carry_the_gateways_policy_only(
    gateway: GatewayFactory, upstreams: Upstreams, body: bytes
) -> None:
    upstreams.stream.app.router.add_get(
        "/api/v1/videos/{id}/stream", serve_with_upstream_cors(body)
    )
    client = await gateway(VOD_CORS_ORIGINS=ORIGINS)
    response = await client.get(
        "/api/v1/videos/v1/stream", headers={"Origin": FRONT_END, "Range": "bytes=0-9"}
    )
    assert response.status == 206
    assert await response.read() == body
    assert response.headers.getall("Access-Control-Allow-Origin") == [FRONT_END]
    assert "Access-Control-Allow-Credentials" not in response.headers
    exposed = tokens(response.headers["Access-Control-Expose-Headers"])
    assert {
        "content-range",
        "content-length",
        "accept-ranges",
        "etag",
        "x-request-id",
        "retry-after",
        "location",
        "ratelimit",
        "x-ratelimit-remaining",
    } <= exposed
    assert {"accept-encoding", "origin"} <= vary(response)

    other = await client.get("/api/v1/videos/v1/stream", headers={"Origin": OTHER})
    assert other.status == 206
    assert not [h for h in other.headers if h.lower().startswith("access-control-")]
    assert "origin" in vary(other)


@RELAYED_BODIES
async def test_an_upstreams_cors_headers_are_dropped_with_cors_off(
    gateway: GatewayFactory, upstreams: Upstreams, body: bytes
) -> None:
    upstreams.stream.app.router.add_get(
        "/api/v1/videos/{id}/stream", serve_with_upstream_cors(body)
    )
    client = await gateway()
    response = await client.get("/api/v1/videos/v1/stream", headers={"Origin": FRONT_END})
    assert response.status == 206
    assert await response.read() == body
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    assert response.headers["ETag"] == '"abc"'
    assert vary(response) == {"accept-encoding"}


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/api/v1/no/such/route", {}, 404, "route_not_found"),
        ("/api/v1/users/me", {"Authorization": "Bearer not-a-jwt"}, 401, "token_invalid"),
    ],
)
async def test_problem_documents_carry_cors_headers(
    gateway: GatewayFactory, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    client = await gateway(VOD_CORS_ORIGINS=ORIGINS)
    response = await client.get(path, headers={"Origin": FRONT_END, **headers})
    await problem(response, status, code)
    assert response.headers["Access-Control-Allow-Origin"] == FRONT_END
    assert "x-request-id" in tokens(response.headers["Access-Control-Expose-Headers"])


async def test_wildcard_allows_any_origin(gateway: GatewayFactory) -> None:
    client = await gateway(VOD_CORS_ORIGINS="*")
    response = await client.options("/api/v1/videos/v1/stream", headers=preflight_headers(OTHER))
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    response = await client.get("/api/v1/videos", headers={"Origin": OTHER})
    assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_non_api_paths_get_no_cors(gateway: GatewayFactory) -> None:
    client = await gateway(VOD_CORS_ORIGINS=ORIGINS)
    response = await client.get("/healthz", headers={"Origin": FRONT_END})
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_a_browser_player_streams_a_range_from_another_origin(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    """The real stack: a published video's stream, a preflight then a ranged GET."""
    stack = await start_stack(
        make_settings(VOD_CORS_ORIGINS=FRONT_END), aiohttp_server, aiohttp_client
    )
    publisher = Publisher(stack, "corsfan", await stack.new_user("corsfan"))
    data = os.urandom(50_000)
    response = await publisher.publish(upload_id=await publisher.upload(data))
    assert response.status == 201, await response.text()
    stream_url = (await response.json())["stream_url"]

    response = await stack.gateway.options(
        stream_url, headers=preflight_headers(FRONT_END, "GET", "range")
    )
    assert response.status == 204
    response = await stack.gateway.get(
        stream_url, headers={"Origin": FRONT_END, "Range": "bytes=100-199"}
    )
    assert response.status == 206
    assert await response.read() == data[100:200]
    assert response.headers["Access-Control-Allow-Origin"] == FRONT_END
    assert response.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert "content-range" in tokens(response.headers["Access-Control-Expose-Headers"])


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("", ()),
        ("HTTPS://Player.Example.com/", ("https://player.example.com",)),
        ("http://localhost:5173, *", ("http://localhost:5173", "*")),
    ],
)
def test_origins_setting_is_normalised(
    make_settings: Callable[..., Settings], raw: str, parsed: tuple[str, ...]
) -> None:
    assert make_settings(VOD_CORS_ORIGINS=raw).cors_origins == parsed


@pytest.mark.parametrize(
    "raw",
    ["player.example.com", "ftp://example.com", "https://example.com/app", "https://h:notaport"],
)
def test_a_malformed_origin_stops_start_up(
    make_settings: Callable[..., Settings], raw: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(VOD_CORS_ORIGINS=raw)
    assert caught.value.variable == "VOD_CORS_ORIGINS"
