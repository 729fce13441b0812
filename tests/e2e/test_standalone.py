"""`make run`: the four apps in one process, embedded back ends, the URL printed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.processes import ROOT, free_port

pytestmark = pytest.mark.e2e


async def test_standalone_serves_all_four_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("gateway", "api", "stream", "scheduler")}
    env = {
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
