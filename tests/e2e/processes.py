"""Running vod processes from tests: free ports, start, wait until healthy, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
HEALTH_TRIES = 300  # x 0.1 s: start-up includes migrations against a real database


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServiceProcess:
    """One vod process; its stderr (JSON logs) goes to a file the test can read on failure."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = field(default="")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL only if it hangs)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def start(
    module: str, env: Mapping[str, str], log_dir: Path, *, name: str | None = None
) -> ServiceProcess:
    name = name or module
    log_path = log_dir / f"{name}.log"
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1", **env}
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServiceProcess(name=name, popen=popen, log_path=log_path)


async def wait_healthy(process: ServiceProcess, url: str, path: str = "/healthz") -> None:
    """Poll ``url + path`` until 200; fail with the process's log if it dies or never answers."""
    process.url = url
    async with aiohttp.ClientSession() as session:
        for _ in range(HEALTH_TRIES):
            if process.popen.poll() is not None:
                raise AssertionError(f"{process.name} exited early:\n{process.log()}")
            try:
                async with session.get(url + path) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            # Polling a process we do not control: the only way to learn it is up.
            await asyncio.sleep(0.1)
    raise AssertionError(f"{process.name} never became healthy:\n{process.log()}")
