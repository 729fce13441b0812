"""`make services`: four processes on the real MariaDB, Redis and RabbitMQ, one journey."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.processes import ServiceSuite, services_env

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture
async def suite(tmp_path: Path, real_backends_env: dict[str, str]) -> AsyncIterator[ServiceSuite]:
    suite = ServiceSuite(services_env(real_backends_env, tmp_path / "blobs"), tmp_path)
    try:
        # All four at once: replicas racing to migrate is the case the migration lock is for.
        await suite.start_all()
        yield suite
    finally:
        codes = suite.stop_all()
    assert codes == dict.fromkeys(codes, 0), suite.logs()


async def test_four_processes_serve_a_signed_in_journey(suite: ServiceSuite) -> None:
    gateway = suite.url("gateway")
    async with aiohttp.ClientSession() as session:
        credentials = {"username": f"svc_{os.urandom(3).hex()}", "password": "services mode"}
        async with session.post(f"{gateway}/api/v1/users", json=credentials) as response:
            assert response.status == 201, await response.text()
        async with session.post(f"{gateway}/api/v1/sessions", json=credentials) as response:
            tokens = await response.json()
        auth = {"Authorization": f"Bearer {tokens['access_token']}", "X-Request-ID": "svc-me-1"}
        async with session.get(f"{gateway}/api/v1/users/me", headers=auth) as response:
            assert response.status == 200
            assert (await response.json())["username"] == credentials["username"]
            assert response.headers["X-Request-ID"] == "svc-me-1"
        # Refresh state is in the database: a restarted api still honours the token.
        # SIGTERM, which must exit 0, and a fresh process in its place.
        assert suite.stop("api_service") == 0
        await suite.start("api_service")
        async with session.post(
            f"{gateway}/api/v1/sessions/refresh",
            json={"refresh_token": tokens["refresh_token"]},
        ) as response:
            assert response.status == 200, await response.text()
        async with session.delete(f"{gateway}/api/v1/sessions", headers=auth) as response:
            assert response.status == 204
        async with session.get(f"{gateway}/api/v1/users/me", headers=auth) as response:
            assert response.status == 401
        # The public port has no /metrics: it is on the operators' listener.
        async with session.get(f"{gateway}/metrics") as response:
            assert response.status == 404
        async with session.get(f"{suite.operators_url('gateway')}/metrics") as response:
            metrics = await response.text()
        # Counted under the route family's template, with the statuses clients saw.
        counted = [
            line
            for line in metrics.splitlines()
            if line.startswith("vod_http_requests_total{")
            and 'route="/api/v1/users' in line
            and 'status="401"' in line
        ]
        assert len(counted) == 1, metrics
        assert counted[0].endswith(" 1.0")
    # The request id crossed the hop into the (first) api process's JSON log lines.
    assert '"request_id":"svc-me-1"' in (suite.log_dir / "api_service.log").read_text()
