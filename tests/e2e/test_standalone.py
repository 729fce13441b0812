"""`make run`: the four apps in one process, embedded back ends, the URL printed."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.processes import ROOT, free_port

pytestmark = pytest.mark.e2e


def standalone_env(ports: dict[str, int]) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "VOD_GATEWAY_PORT": str(ports["gateway"]),
        "VOD_METRICS_PORT": str(free_port()),
        "VOD_API_PORT": str(ports["api"]),
        "VOD_STREAM_PORT": str(ports["stream"]),
        "VOD_SCHEDULER_PORT": str(ports["scheduler"]),
        "VOD_API_URL": f"http://127.0.0.1:{ports['api']}",
        "VOD_STREAM_URL": f"http://127.0.0.1:{ports['stream']}",
        "VOD_SCHEDULER_URL": f"http://127.0.0.1:{ports['scheduler']}",
    }


def free_ports() -> dict[str, int]:
    return {name: free_port() for name in ("gateway", "api", "stream", "scheduler")}


async def test_standalone_serves_all_four_and_stops_cleanly(tmp_path: Path) -> None:
    ports = free_ports()
    env = standalone_env(ports)
    # cwd is a fresh folder: everything standalone writes must land under its ./var.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "standalone",
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        assert line.decode().startswith(f"vod is running: {gateway}/")

        async with aiohttp.ClientSession() as session:
            for port in ports.values():
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    assert response.status == 200, await response.text()
            # A real request through the gateway to an upstream and back.
            async with session.post(
                f"{gateway}/api/v1/users", json={"username": "standalone", "password": "pw123456"}
            ) as response:
                assert response.status == 201, await response.text()
                assert response.headers["X-Request-ID"]
            async with session.get(f"{gateway}/api/v1/users/standalone") as response:
                assert (await response.json())["username"] == "standalone"

        assert (tmp_path / "var" / "vod.db").exists()
        assert (tmp_path / "var" / "jwt-ed25519-private.pem").stat().st_mode & 0o077 == 0
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=60)
    assert code == 0


async def test_standalone_logs_one_short_line_per_proxied_request(tmp_path: Path) -> None:
    ports = free_ports()
    # VOD_LOG_FORMAT=text: what a terminal gets (stderr is a pipe here, which gets JSON).
    env = standalone_env(ports) | {"VOD_LOG_FORMAT": "text"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "standalone",
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), timeout=60)
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        async with (
            aiohttp.ClientSession() as session,
            # Through the gateway to the api and back, under a request id of our own.
            session.get(
                f"{gateway}/api/v1/videos", headers={"X-Request-ID": "one-line-please"}
            ) as response,
        ):
            assert response.status == 200, await response.text()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    lines = [line for line in err.decode().splitlines() if "one-line-please" in line]
    # The gateway's line only: the api's line for the same request is at DEBUG.
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d gateway GET /api/v1/videos 200 \d+ms rid=one-line-please", lines[0]
    ), lines
