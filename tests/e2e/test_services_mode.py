"""`make services`: four processes on the real MariaDB, Redis and RabbitMQ, one journey."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import JWT_PRIVATE_KEY, JWT_PUBLIC_KEY
from tests.e2e.processes import ServiceProcess, free_port, start, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SERVICES = {
    "api_service": "VOD_API_PORT",
    "stream_service": "VOD_STREAM_PORT",
    "scheduler_service": "VOD_SCHEDULER_PORT",
    "gateway": "VOD_GATEWAY_PORT",
}


@dataclass
class Suite:
    processes: dict[str, ServiceProcess]
    env: dict[str, str]
    ports: dict[str, int]
    log_dir: Path

    def __getitem__(self, module: str) -> ServiceProcess:
        return self.processes[module]

    async def restart(self, module: str) -> None:
        """SIGTERM the service, which must exit 0, and start a fresh process in its place."""
        assert self.processes[module].terminate() == 0
        process = start(module, self.env, self.log_dir, name=f"{module}-2")
        self.processes[module] = process
        await wait_healthy(process, f"http://127.0.0.1:{self.ports[module]}", "/readyz")


@pytest.fixture
async def suite(tmp_path: Path, real_backends_env: dict[str, str]) -> AsyncIterator[Suite]:
    ports = {module: free_port() for module in SERVICES}
    env = {
        **real_backends_env,
        "VOD_BLOB_URL": f"file://{tmp_path}/blobs",
        "VOD_INTERNAL_TOKEN": "services-mode-" + os.urandom(12).hex(),
        "VOD_JWT_PRIVATE_KEY": JWT_PRIVATE_KEY,
        "VOD_JWT_PUBLIC_KEY": JWT_PUBLIC_KEY,
        "VOD_DB_MIGRATE": "1",
        "VOD_API_URL": f"http://127.0.0.1:{ports['api_service']}",
        "VOD_STREAM_URL": f"http://127.0.0.1:{ports['stream_service']}",
        "VOD_SCHEDULER_URL": f"http://127.0.0.1:{ports['scheduler_service']}",
        "VOD_ARGON2_TIME_COST": "1",
        "VOD_ARGON2_MEMORY_KIB": "1024",
        **{variable: str(ports[module]) for module, variable in SERVICES.items()},
    }
    processes: dict[str, ServiceProcess] = {}
    try:
        # All four at once: replicas racing to migrate is the case the migration lock is for.
        for module in SERVICES:
            processes[module] = start(module, env, tmp_path)
        for module, process in processes.items():
            await wait_healthy(process, f"http://127.0.0.1:{ports[module]}", "/readyz")
        yield Suite(processes, env, ports, tmp_path)
    finally:
        codes = {module: process.terminate() for module, process in processes.items()}
    assert codes == dict.fromkeys(processes, 0), {m: processes[m].log()[-2000:] for m in codes}


async def test_four_processes_serve_a_signed_in_journey(suite: Suite) -> None:
    gateway = suite["gateway"].url
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
        await suite.restart("api_service")
        async with session.post(
            f"{gateway}/api/v1/sessions/refresh",
            json={"refresh_token": tokens["refresh_token"]},
        ) as response:
            assert response.status == 200, await response.text()
        async with session.delete(f"{gateway}/api/v1/sessions", headers=auth) as response:
            assert response.status == 204
        async with session.get(f"{gateway}/api/v1/users/me", headers=auth) as response:
            assert response.status == 401
        async with session.get(f"{suite['gateway'].url}/metrics") as response:
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
