"""What every benchmark needs: Debian tools installed on demand, free ports, server
processes with their CPU time, a published video's rows written straight to the database,
wrk with a JSON summary, and the machine's description. Not a benchmark itself (the
leading underscore keeps ``python -m bench`` from running it)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.db import new_id, open_database
from shared.db.schema import blobs, users, videos

ROOT: Final = Path(__file__).resolve().parents[1]
RESULTS: Final = Path(__file__).resolve().parent / "results"
HEALTH_TRIES: Final = 300

# wrk's Lua ending: a JSON summary on stdout (prepended to a benchmark's own script).
WRK_DONE: Final = """\
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{"requests": %d, "bytes": %d, "duration_us": %d, "errors": %d, '
    .. '"p50_ms": %.2f, "p99_ms": %.2f}\\n',
    summary.requests, summary.bytes, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def ensure_debian_tool(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` first when it is missing."""
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/usr/bin")
    if found:
        return found
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", package],
        check=True,
        capture_output=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/usr/bin")
    if not found:
        raise RuntimeError(f"{package} installed but no {command} on PATH")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_reachable() -> bool:
    """Whether this machine's Redis answers on 6379 (else the benchmarks embed one)."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), 1):
            return True
    except OSError:
        return False


def machine() -> dict[str, Any]:
    """Where a figure came from (cores, memory, kernel, Python, load when it started)."""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def unsigned_public_key() -> str:
    """A key nobody signs with: the gateway needs one to start; anonymous reads need none."""
    return signing_key_pair()[1]


def signing_key_pair() -> tuple[str, str]:
    """A fresh Ed25519 pair as PEM: (private for api_service, public for the gateway)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


# -- rows --------------------------------------------------------------------------------


def _video_row(
    video_id: str, owner_id: str, *, content_hash: str, size: int, filename: str, now: datetime
) -> dict[str, object]:
    """A ready video's row, as the benchmarks write them."""
    return {
        "id": video_id,
        "owner_id": owner_id,
        "upload_id": new_id(),
        "title": "bench",
        "description": "",
        "content_hash": content_hash,
        "size": size,
        "filename": filename,
        "status": "ready",
        "created_at": now,
        "updated_at": now,
    }


async def insert_video(
    db_url: str, *, content_hash: str, size: int, filename: str = "film.mp4"
) -> tuple[str, str]:
    """Migrates ``db_url`` and writes a user "bench" and a ready video of it over the blob
    ``content_hash`` (whose file the caller provides): (user id, video id)."""
    now = datetime.now(UTC)
    owner_id, video_id = new_id(), new_id()
    database = await open_database(db_url)
    try:
        await database.migrate()
        async with database.transaction() as conn:
            await conn.execute(
                users.insert().values(
                    id=owner_id,
                    username="bench",
                    username_key="bench",
                    password_hash="!",  # noqa: S106 - nobody signs in as the bench
                    created_at=now,
                )
            )
            await conn.execute(
                blobs.insert().values(
                    content_hash=content_hash, size=size, ref_count=1, created_at=now
                )
            )
            await conn.execute(
                videos.insert().values(
                    _video_row(
                        video_id,
                        owner_id,
                        content_hash=content_hash,
                        size=size,
                        filename=filename,
                        now=now,
                    )
                )
            )
    finally:
        await database.close()
    return owner_id, video_id


async def add_video(
    db_url: str, owner_id: str, *, content_hash: str, size: int, filename: str = "film.mp4"
) -> str:
    """A further ready video of ``owner_id`` over the blob ``insert_video`` wrote (the user
    and the blob exist once per database), the blob's reference count raised: its id."""
    video_id = new_id()
    database = await open_database(db_url)
    try:
        async with database.transaction() as conn:
            row = _video_row(
                video_id,
                owner_id,
                content_hash=content_hash,
                size=size,
                filename=filename,
                now=datetime.now(UTC),
            )
            await conn.execute(videos.insert().values(row))
            await conn.execute(
                blobs.update()
                .where(blobs.c.content_hash == content_hash)
                .values(ref_count=blobs.c.ref_count + 1)
            )
    finally:
        await database.close()
    return video_id


# -- processes -----------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.popen.pid)

    def vm_hwm(self) -> int:
        """The kernel's peak resident set of the process, in bytes."""
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no VmHWM for {self.name}")
        return int(match[1]) * 1024

    def processes(self) -> list[psutil.Process]:
        """The process and its children (nginx's worker)."""
        parent = psutil.Process(self.popen.pid)
        return [parent, *parent.children(recursive=True)]

    def cpu_seconds(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.processes())

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


# Variables of the bench's own environment handed to the servers it starts.
PASSED_THROUGH: Final = ("VOD_UVLOOP",)


def start(name: str, argv: list[str], env: Mapping[str, str], url: str, work: Path) -> Server:
    """``argv`` in the repository with only ``env`` (and PATH, and ``VOD_UVLOOP`` when set,
    to compare event loops); output to ``work/name.log``."""
    log_path = work / f"{name}.log"
    passed = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **passed, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server(name, popen, url, log_path)


async def wait_ready(server: Server, path: str, session: aiohttp.ClientSession) -> None:
    for _ in range(HEALTH_TRIES):
        if server.popen.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_path.read_text()}")
        try:
            async with session.head(server.url + path) as response:
                if response.status < 500:  # noqa: PLR2004 - it answers
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)  # polling a process we do not control
    raise RuntimeError(f"{server.name} never answered:\n{server.log_path.read_text()}")


def median_of(runs: list[dict[str, Any]], fields: tuple[str, ...]) -> dict[str, Any]:
    """Repeated runs of one target as one: the median of each of ``fields`` and of each
    process's ``cpu_cores``, the sum of ``errors``."""
    merged: dict[str, Any] = {f: statistics.median(run[f] for run in runs) for f in fields}
    merged["errors"] = sum(run["errors"] for run in runs)
    merged["cpu_cores"] = {
        name: statistics.median(run["cpu_cores"][name] for run in runs)
        for name in runs[0]["cpu_cores"]
    }
    return merged


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- wrk -----------------------------------------------------------------------------------


def run_wrk(
    wrk: str,
    script: Path,
    url: str,
    *,
    connections: int,
    seconds: float,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One wrk run (one thread) with ``script`` (which ends in ``WRK_DONE``): its JSON
    summary plus ``cpu_seconds``, wrk's own CPU time."""
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url,
    ]
    before = children_cpu()
    completed = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True
    )
    match = re.search(r"^\{.*\}$", completed.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no summary from wrk:\n{completed.stdout}\n{completed.stderr}")
    summary: dict[str, Any] = json.loads(match[0])
    summary["cpu_seconds"] = children_cpu() - before
    return summary
