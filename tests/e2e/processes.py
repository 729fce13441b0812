"""Running vod processes from tests: free ports, start, wait until healthy, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

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

    def kill(self) -> int:
        """SIGKILL, as a crash or the OOM killer would: nothing is cleaned up."""
        if self.popen.poll() is None:
            self.popen.kill()
        return self.popen.wait()

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
    return _spawn(["-m", module], env, log_dir, name or module)


def start_code(code: str, env: Mapping[str, str], log_dir: Path, *, name: str) -> ServiceProcess:
    """Like ``start``, for a launcher given as Python source (``python -c``): a service
    with options its ``__main__`` does not read from the environment."""
    return _spawn(["-c", code], env, log_dir, name)


def _spawn(args: list[str], env: Mapping[str, str], log_dir: Path, name: str) -> ServiceProcess:
    log_path = log_dir / f"{name}.log"
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1", **env}
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, *args],
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


def stop_together(processes: Iterable[ServiceProcess], wait: float) -> dict[str, int]:
    """SIGTERM every process still running, all at once (they drain side by side), and
    their exit codes by name; one that has not exited within ``wait`` is SIGKILLed."""
    running = [process for process in processes if process.popen.poll() is None]
    for process in running:
        process.popen.send_signal(signal.SIGTERM)
    codes: dict[str, int] = {}
    for process in running:
        try:
            codes[process.name] = process.popen.wait(wait)
        except subprocess.TimeoutExpired:
            codes[process.name] = process.kill()
    return codes


async def scrape(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` with ``labels`` on one process's /metrics."""
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, *, deadline: float, poll: float = 0.1
) -> None:
    """Poll ``check`` (a state of another process) until it holds, for up to ``deadline``."""
    for _ in range(int(deadline / poll)):
        if await check():
            return
        await asyncio.sleep(poll)  # polling processes we do not control
    raise AssertionError(f"not within {deadline} s: {what}")


# The four services of services mode, upstreams first, and the variable naming each port.
SERVICE_PORTS = {
    "api_service": "VOD_API_PORT",
    "stream_service": "VOD_STREAM_PORT",
    "scheduler_service": "VOD_SCHEDULER_PORT",
    "gateway": "VOD_GATEWAY_PORT",
}


@dataclass
class ServiceSuite:
    """The four services as processes on one environment (``services_env``): start them,
    stop or restart one while the others run, and stop all at the end."""

    env: dict[str, str]
    log_dir: Path
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def url(self, module: str) -> str:
        return f"http://127.0.0.1:{self.env[SERVICE_PORTS[module]]}"

    def operators_url(self, module: str) -> str:
        """Where ``module``'s ``/metrics`` and detailed ``/readyz`` are: the gateway's on
        its operators' listener, an upstream's on its own (internal) port."""
        if module == "gateway":
            return f"http://127.0.0.1:{self.env['VOD_METRICS_PORT']}"
        return self.url(module)

    async def start(self, module: str) -> ServiceProcess:
        """Start ``module`` (a fresh log file per start) and wait until it is ready."""
        self.starts[module] = self.starts.get(module, 0) + 1
        name = module if self.starts[module] == 1 else f"{module}-{self.starts[module]}"
        process = start(module, self.env, self.log_dir, name=name)
        self.processes[module] = process
        await wait_healthy(process, self.url(module), "/readyz")
        return process

    async def start_all(self) -> None:
        # All at once: replicas racing to migrate is what the migration lock is for.
        for module in SERVICE_PORTS:
            self.starts[module] = 1
            self.processes[module] = start(module, self.env, self.log_dir)
        for module, process in self.processes.items():
            await wait_healthy(process, self.url(module), "/readyz")

    def stop(self, module: str) -> int:
        """SIGTERM ``module`` and wait for it to exit; its exit code."""
        return self.processes[module].terminate()

    def stop_all(self) -> dict[str, int]:
        """Stop every process, gateway first; their exit codes."""
        return {
            module: self.processes[module].terminate()
            for module in reversed(SERVICE_PORTS)
            if module in self.processes
        }

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-tail:]}" for p in self.processes.values())


def services_env(backends: Mapping[str, str], blob_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a services-mode suite on ``backends`` (``VOD_DB_URL``,
    ``VOD_REDIS_URL``, ``VOD_AMQP_URL``, ``VOD_NAMESPACE``), each service on a free port."""
    from tests.conftest import JWT_PRIVATE_KEY, JWT_PUBLIC_KEY

    ports = {module: free_port() for module in SERVICE_PORTS}
    return {
        **backends,
        "VOD_BLOB_URL": f"file://{blob_dir}",
        "VOD_INTERNAL_TOKEN": "services-mode-" + os.urandom(12).hex(),
        "VOD_JWT_PRIVATE_KEY": JWT_PRIVATE_KEY,
        "VOD_JWT_PUBLIC_KEY": JWT_PUBLIC_KEY,
        "VOD_DB_MIGRATE": "1",
        "VOD_API_URL": f"http://127.0.0.1:{ports['api_service']}",
        "VOD_STREAM_URL": f"http://127.0.0.1:{ports['stream_service']}",
        "VOD_SCHEDULER_URL": f"http://127.0.0.1:{ports['scheduler_service']}",
        "VOD_ARGON2_TIME_COST": "1",
        "VOD_ARGON2_MEMORY_KIB": "1024",
        **{variable: str(ports[module]) for module, variable in SERVICE_PORTS.items()},
        "VOD_METRICS_PORT": str(free_port()),
        **extra,
    }
