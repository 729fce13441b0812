"""The web layer every service shares: problem documents, request ids, guards, probes."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from shared.errors import NotFoundError, RateLimitedError
from shared.logging import TextFormatter
from shared.settings import Settings
from shared.web import READINESS_CHECKS, create_base_app, json_response, read_json
from tests.problems import problem

ClientFactory = Callable[[web.Application], Any]


async def _raise_not_found(_request: web.Request) -> web.Response:
    raise NotFoundError("No video 42.", code="video_not_found")


async def _raise_rate_limited(_request: web.Request) -> web.Response:
    raise RateLimitedError("Slow down.", retry_after=7)


async def _explode(_request: web.Request) -> web.Response:
    raise RuntimeError("secret internals: password=hunter2")


async def _echo_json(request: web.Request) -> web.Response:
    return json_response({"got": await read_json(request)})


async def _item(request: web.Request) -> web.Response:
    return json_response({"id": request.match_info["item_id"]})


def build_app(settings: Settings, *, guarded: bool = True) -> web.Application:
    app = create_base_app("test", settings, require_internal_token=guarded)
    app.router.add_get("/missing", _raise_not_found)
    app.router.add_get("/limited", _raise_rate_limited)
    app.router.add_get("/explode", _explode)
    app.router.add_post("/echo", _echo_json)
    app.router.add_get("/items/{item_id}", _item)
    return app


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings]
) -> TestClient[web.Request, web.Application]:
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        build_app(make_settings(VOD_MAX_JSON_BYTES="1024"), guarded=False)
    )
    return client


async def test_app_error_becomes_problem_document(client: TestClient[Any, Any]) -> None:
    body = await problem(await client.get("/missing"), 404, "video_not_found")
    assert body["detail"] == "No video 42."


async def test_rate_limit_carries_retry_after(client: TestClient[Any, Any]) -> None:
    response = await client.get("/limited")
    await problem(response, 429, "rate_limited")
    assert response.headers["Retry-After"] == "7"


async def test_unknown_route_is_problem_document(client: TestClient[Any, Any]) -> None:
    await problem(await client.get("/nowhere"), 404, "route_not_found")


async def test_wrong_method_is_problem_document_with_allow(client: TestClient[Any, Any]) -> None:
    response = await client.delete("/missing")
    await problem(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]


async def test_unexpected_error_hides_internals_and_is_logged_once(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        response = await client.get("/explode", headers={"X-Request-ID": "req-explode-1"})
    body = await problem(response, 500, "internal_error")
    text = str(body)
    assert "hunter2" not in text
    assert "Traceback" not in text
    assert body["request_id"] == "req-explode-1"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None


async def test_request_id_is_kept_when_valid_and_made_when_not(
    client: TestClient[Any, Any],
) -> None:
    kept = await client.get("/items/1", headers={"X-Request-ID": "abc-123"})
    assert kept.headers["X-Request-ID"] == "abc-123"
    made = await client.get("/items/1", headers={"X-Request-ID": "bad id\twith spaces"})
    assert made.headers["X-Request-ID"] not in ("", "bad id\twith spaces")
    assert len(made.headers["X-Request-ID"]) == 32
    fresh = await client.get("/items/1")
    assert fresh.headers["X-Request-ID"] != made.headers["X-Request-ID"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "malformed_json"),
        (b'{"a": 1}', "text/plain", 415, "unsupported_media_type"),
        (b'{"a": "' + b"x" * 2000 + b'"}', "application/json", 413, "payload_too_large"),
    ],
)
async def test_bad_json_bodies_are_4xx_never_500(
    client: TestClient[Any, Any], body: bytes, content_type: str, status: int, code: str
) -> None:
    response = await client.post("/echo", data=body, headers={"Content-Type": content_type})
    await problem(response, status, code)


async def test_good_json_round_trips(client: TestClient[Any, Any]) -> None:
    response = await client.post("/echo", json={"title": "Café ☕"})
    assert response.status == 200
    assert await response.json() == {"got": {"title": "Café ☕"}}


async def test_metrics_count_requests_by_route_template(client: TestClient[Any, Any]) -> None:
    for item in ("1", "2", "3"):
        await client.get(f"/items/{item}")
    await client.get("/missing")
    text = await (await client.get("/metrics")).text()
    assert (
        'vod_http_requests_total{method="GET",route="/items/{item_id}",service="test",'
        'status="200"} 3.0' in text
    )
    assert 'route="/missing",service="test",status="404"} 1.0' in text
    assert "vod_http_request_duration_seconds_bucket" in text


async def test_internal_token_guards_everything_but_probes(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    internal_headers: dict[str, str],
) -> None:
    client = await aiohttp_client(build_app(make_settings()))
    await problem(await client.get("/items/1"), 403, "internal_token_required")
    wrong = {"X-Internal-Token": "x" * 40}
    await problem(await client.get("/items/1", headers=wrong), 403, "internal_token_required")
    assert (await client.get("/items/1", headers=internal_headers)).status == 200
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(probe)).status == 200


async def test_readyz_reports_each_check_and_fails_when_one_fails(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings]
) -> None:
    app = build_app(make_settings(), guarded=False)

    async def healthy() -> None:
        return None

    async def broken() -> None:
        raise ConnectionRefusedError

    app[READINESS_CHECKS]["database"] = healthy
    app[READINESS_CHECKS]["redis"] = broken
    client = await aiohttp_client(app)
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["checks"] == {"database": "ok", "redis": "error: ConnectionRefusedError"}
    assert (await client.get("/healthz")).status == 200


async def test_a_hostile_path_cannot_forge_or_paint_a_text_log_line(
    client: TestClient[web.Request, web.Application], caplog: pytest.LogCaptureFixture
) -> None:
    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(TextFormatter("test"))
    request_log = logging.getLogger("shared.web")
    caplog.set_level(logging.INFO, logger="shared.web")
    request_log.addHandler(handler)
    try:
        # Decoded by the server: a newline, a forged line, and a clear-screen sequence.
        response = await client.get("/items/x%0A12:00:00%20gateway%20GET%20/admin%20200%1B[2J")
        assert response.status == 404  # the decoded path has a "/" more: no route
    finally:
        request_log.removeHandler(handler)
    written = terminal.getvalue()
    assert written.count("\n") == 1, written
    assert "\x1b" not in written
    assert "/items/x\\x0a12:00:00 gateway GET /admin 200\\x1b[2J 404 " in written
