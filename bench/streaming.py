"""Streaming throughput: one 256 MiB video, full-file GETs and 1 MiB random-range GETs.

Three servers of the same file on disk, measured in one run, interleaved (a, b, c, a, b,
c, ...) so the host's drift hits all alike; figures are medians and ratios to nginx:

- ``gateway``: ``python -m gateway`` in front of ``python -m stream_service``, the public
  path (the stream is public: no token);
- ``direct``: ``python -m stream_service`` alone, with the internal token header, as the
  gateway calls it;
- ``nginx``: Debian's nginx (installed with apt-get when missing), one worker,
  ``sendfile on``, a generated configuration on a free loopback port: the reference.

Both vod services run as in production (default asyncio loop, so ``loop.sendfile``) on
the embedded back ends, the video's rows and blob written directly (the upload path has
its own benchmark). The load tool is wrk (Debian's ``wrk``, installed when missing), one
thread: ``-c 4`` full-file GETs, ``-c 8`` GETs of 1 MiB at a random offset (a Lua script
builds each ``Range`` header). The per-client stream cap is raised for the run: every wrk
connection comes from 127.0.0.1. CPU seconds of each process (wrk included) are noted
beside every figure: on two cores the load tool shares the machine with the servers.

Then latency against load: 1 MiB ranges at 1, 2, 4, ... 32 connections, 2 s per point,
targets interleaved (``sweep`` in the JSON, ``streaming.png``; ``VOD_BENCH_STREAM_SWEEP``
picks the counts, empty skips it).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import statistics
import sys
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench._harness import (
    WRK_DONE,
    Server,
    ensure_debian_tool,
    free_port,
    insert_video,
    machine,
    median_of,
    start,
    unsigned_public_key,
    wait_ready,
)
from bench._harness import run_wrk as harness_run_wrk
from shared.content_hash import ContentHasher
from shared.layout import content_blob_key

NAME: Final = "streaming"

MIB: Final = 1024 * 1024
FILE_BYTES: Final = 256 * MIB
RANGE_BYTES: Final = MIB
SECONDS: Final = int(os.environ.get("VOD_BENCH_STREAM_SECONDS", "6"))
REPEATS: Final = int(os.environ.get("VOD_BENCH_STREAM_REPEATS", "3"))
WARM_UP_SECONDS: Final = 2
CONNECTIONS: Final = {"full": 4, "ranges": 8}
TARGETS: Final = ("gateway", "direct", "nginx")
# The latency-against-load sweep (ranges only): connection counts, seconds per point;
# VOD_BENCH_STREAM_SWEEP="" skips it.
SWEEP: Final = tuple(
    int(c) for c in os.environ.get("VOD_BENCH_STREAM_SWEEP", "1,2,4,8,16,32").split(",") if c
)
SWEEP_SECONDS: Final = 2.0
# Issue 10's targets, as ratios to nginx: (kind, target, at least).
TARGET_RATIOS: Final = (
    ("full", "direct", 0.9),
    ("ranges", "direct", 0.8),
    ("full", "gateway", 0.5),
    ("ranges", "gateway", 0.5),
)

NGINX_CONF: Final = """\
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    types {{ video/mp4 mp4; }}
    server {{
        listen 127.0.0.1:{port};
        location = /film.mp4 {{ alias {film}; }}
    }}
}}
"""

# wrk's Lua: a random 1 MiB range per request (when RANGE is set), headers from the
# environment, and a JSON summary on stdout at the end.
WRK_SCRIPT: Final = (
    """\
local range_bytes = tonumber(os.getenv("BENCH_RANGE_BYTES") or "0")
local file_bytes = tonumber(os.getenv("BENCH_FILE_BYTES"))
local token = os.getenv("BENCH_INTERNAL_TOKEN")
if token and token ~= "" then wrk.headers["X-Internal-Token"] = token end

function setup(thread) thread:set("seed", math.random(1, 1000000)) end
function init(args) math.randomseed(seed) end

function request()
  if range_bytes > 0 then
    local first = math.random(0, file_bytes - range_bytes)
    wrk.headers["Range"] = "bytes=" .. first .. "-" .. (first + range_bytes - 1)
  end
  return wrk.format("GET", wrk.path)
end

"""
    + WRK_DONE
)

# -- the film ------------------------------------------------------------------------------


def write_film(path: Path) -> str:
    """``FILE_BYTES`` of incompressible bytes (one random MiB salted per MiB); its content hash."""
    block = bytearray(os.urandom(MIB))
    hasher = ContentHasher()
    with path.open("wb") as file:
        for index in range(FILE_BYTES // MIB):
            block[:8] = index.to_bytes(8, "big")
            hasher.update(block)
            file.write(block)
    return hasher.hexdigest()


async def publish(db_url: str, blob_root: Path, film: Path) -> str:
    """The rows of a published video over ``film`` (hard-linked into the blob store)."""
    content_hash = await asyncio.to_thread(write_film, film)
    target = blob_root / content_blob_key(content_hash)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(film, target)
    _, video_id = await insert_video(db_url, content_hash=content_hash, size=FILE_BYTES)
    return video_id


# -- the servers ---------------------------------------------------------------------------


async def check_same_bytes(
    session: aiohttp.ClientSession, urls: Mapping[str, tuple[str, Mapping[str, str]]]
) -> None:
    """Every target serves the same bytes for the same range: the comparison is fair."""
    digests = {}
    for name, (url, headers) in urls.items():
        async with session.get(url, headers={**headers, "Range": "bytes=1000-2049999"}) as r:
            if r.status != 206:  # noqa: PLR2004
                raise RuntimeError(f"{name}: {r.status} {await r.text()}")
            digests[name] = hashlib.sha256(await r.read()).hexdigest()
    if len(set(digests.values())) != 1:
        raise RuntimeError(f"targets disagree on the bytes: {digests}")


# -- wrk -----------------------------------------------------------------------------------


def run_wrk(
    wrk: str,
    script: Path,
    url: str,
    *,
    kind: str,
    seconds: float,
    token: str,
    connections: int | None = None,
) -> dict[str, Any]:
    env = {
        "BENCH_FILE_BYTES": str(FILE_BYTES),
        "BENCH_RANGE_BYTES": str(RANGE_BYTES if kind == "ranges" else 0),
        "BENCH_INTERNAL_TOKEN": token,
    }
    return harness_run_wrk(
        wrk, script, url, connections=connections or CONNECTIONS[kind], seconds=seconds, env=env
    )


def measure_once(
    wrk: str,
    script: Path,
    *,
    target: str,
    url: str,
    kind: str,
    token: str,
    servers: Mapping[str, Server],
) -> dict[str, Any]:
    before = {name: s.cpu_seconds() for name, s in servers.items()}
    summary = run_wrk(wrk, script, url, kind=kind, seconds=SECONDS, token=token)
    seconds = summary["duration_us"] / 1e6
    cpu = {name: s.cpu_seconds() - before[name] for name, s in servers.items()}
    cpu["wrk"] = summary["cpu_seconds"]
    requests = max(summary["requests"], 1)
    return {
        "target": target,
        "kind": kind,
        "requests": summary["requests"],
        "errors": summary["errors"],
        "seconds": round(seconds, 2),
        "mb_per_s": round(summary["bytes"] / seconds / 1e6, 1),
        "req_per_s": round(summary["requests"] / seconds, 1),
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        # CPU seconds per second of wall time: 1.0 is one core saturated.
        "cpu_cores": {name: round(value / seconds, 2) for name, value in cpu.items()},
        # What each request cost each process: the figure to judge a change by on a
        # shared machine, where MB/s moves with everyone else's load.
        "cpu_us_per_request": {name: round(value / requests * 1e6) for name, value in cpu.items()},
    }


# -- the run -------------------------------------------------------------------------------


async def start_services(work: Path, token: str) -> tuple[dict[str, Server], str]:
    db_url = f"sqlite+aiosqlite:///{work}/vod.db"
    video_id = await publish(db_url, work / "blobs", work / "film.mp4")
    stream_port, gateway_port, nginx_port = free_port(), free_port(), free_port()
    env = {
        "VOD_DB_URL": db_url,
        "VOD_REDIS_URL": "memory://",
        "VOD_AMQP_URL": "memory://",
        "VOD_BLOB_URL": f"file://{work}/blobs",
        "VOD_INTERNAL_TOKEN": token,
        "VOD_JWT_PUBLIC_KEY": unsigned_public_key(),
        "VOD_HOST": "127.0.0.1",
        "VOD_STREAM_PORT": str(stream_port),
        "VOD_GATEWAY_PORT": str(gateway_port),
        "VOD_METRICS_PORT": str(free_port()),
        "VOD_API_URL": "http://127.0.0.1:1",
        "VOD_STREAM_URL": f"http://127.0.0.1:{stream_port}",
        "VOD_SCHEDULER_URL": "http://127.0.0.1:1",
        "VOD_STREAM_MAX_PER_CLIENT": "64",
        "VOD_VAR_DIR": str(work / "var"),
        "VOD_LOG_LEVEL": "WARNING",
    }
    nginx = ensure_debian_tool("nginx", "nginx")
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=nginx_port, film=work / "film.mp4"))
    python = sys.executable
    servers = {
        "stream_service": start(
            "stream_service",
            [python, "-m", "stream_service"],
            env,
            f"http://127.0.0.1:{stream_port}",
            work,
        ),
        "gateway": start(
            "gateway", [python, "-m", "gateway"], env, f"http://127.0.0.1:{gateway_port}", work
        ),
        "nginx": start(
            "nginx",
            [nginx, "-p", str(work), "-c", str(conf)],
            {},
            f"http://127.0.0.1:{nginx_port}",
            work,
        ),
    }
    return servers, video_id


async def prepare(work: Path, token: str) -> tuple[dict[str, Server], dict[str, str]]:
    servers, video_id = await start_services(work, token)
    path = f"/api/v1/videos/{video_id}/stream"
    urls = {
        "gateway": servers["gateway"].url + path,
        "direct": servers["stream_service"].url + path,
        "nginx": servers["nginx"].url + "/film.mp4",
    }
    async with aiohttp.ClientSession() as session:
        await wait_ready(servers["stream_service"], "/healthz", session)
        await wait_ready(servers["gateway"], "/healthz", session)
        await wait_ready(servers["nginx"], "/film.mp4", session)
        await check_same_bytes(
            session,
            {
                "gateway": (urls["gateway"], {}),
                "direct": (urls["direct"], {"X-Internal-Token": token}),
                "nginx": (urls["nginx"], {}),
            },
        )
    return servers, urls


def run() -> dict[str, Any]:
    wrk = ensure_debian_tool("wrk", "wrk")
    work = Path(tempfile.mkdtemp(prefix="vod-bench-streaming-"))
    work.chmod(0o755)  # nginx's worker runs as another user and must reach the film
    token = secrets.token_urlsafe(24)
    servers: dict[str, Server] = {}
    runs: list[dict[str, Any]] = []
    started_on = machine()
    try:
        script = work / "bench.lua"
        script.write_text(WRK_SCRIPT)
        servers, urls = asyncio.run(prepare(work, token))
        for kind in ("full", "ranges"):
            for target in TARGETS:  # page cache, pools, first-touch memory
                run_wrk(wrk, script, urls[target], kind=kind, seconds=WARM_UP_SECONDS, token=token)
            for _ in range(REPEATS):
                for target in TARGETS:
                    runs.append(
                        measure_once(
                            wrk,
                            script,
                            target=target,
                            url=urls[target],
                            kind=kind,
                            token=token if target == "direct" else "",
                            servers=servers,
                        )
                    )
        sweep = measure_sweep(wrk, script, urls, token)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": NAME,
        "sweep": sweep,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": started_on,
        "file_bytes": FILE_BYTES,
        "range_bytes": RANGE_BYTES,
        "seconds_per_run": SECONDS,
        "repeats": REPEATS,
        "connections": CONNECTIONS,
        "load_tool": "wrk -t1 (Lua script for random ranges)",
        "summary": _summarize_runs(runs),
        "runs": runs,
    }


def measure_sweep(wrk: str, script: Path, urls: dict[str, str], token: str) -> list[dict[str, Any]]:
    """Latency against load: 1 MiB random ranges at each of ``SWEEP`` connection counts,
    ``SWEEP_SECONDS`` each, targets interleaved (the plot's data)."""
    points = []
    for connections in SWEEP:
        for target in TARGETS:
            summary = run_wrk(
                wrk,
                script,
                urls[target],
                kind="ranges",
                seconds=SWEEP_SECONDS,
                token=token if target == "direct" else "",
                connections=connections,
            )
            seconds = summary["duration_us"] / 1e6
            points.append(
                {
                    "target": target,
                    "connections": connections,
                    "mb_per_s": round(summary["bytes"] / seconds / 1e6, 1),
                    "req_per_s": round(summary["requests"] / seconds, 1),
                    "p50_ms": summary["p50_ms"],
                    "p99_ms": summary["p99_ms"],
                    "errors": summary["errors"],
                }
            )
    return points


def _summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in ("full", "ranges"):
        medians = {
            target: median_of(
                [r for r in runs if r["kind"] == kind and r["target"] == target],
                ("mb_per_s", "req_per_s", "p99_ms"),
            )
            for target in TARGETS
        }
        reference = medians["nginx"]["mb_per_s"]
        for target, values in medians.items():
            values["x_nginx"] = round(values["mb_per_s"] / reference, 2)
            of_target = [r for r in runs if r["kind"] == kind and r["target"] == target]
            values["cpu_us_per_request"] = {
                name: statistics.median(r["cpu_us_per_request"][name] for r in of_target)
                for name in of_target[0]["cpu_us_per_request"]
            }
        summary[kind] = medians
    return summary


def summarize(result: dict[str, Any]) -> list[str]:
    lines = [
        f"One {result['file_bytes'] // MIB} MiB video; {result['load_tool']}, "
        f"{result['seconds_per_run']} s per run, median of {result['repeats']} interleaved runs. "
        f"Connections: {result['connections']}. Ratios are to nginx (sendfile, 1 worker) "
        "in the same run. CPU in cores busy (1.0 = one core).",
        "",
        "| GETs | target | MB/s | req/s | x nginx | p99 ms | errors "
        "| CPU stream / gateway / nginx / wrk | CPU µs per request, same order |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, medians in result["summary"].items():
        for target, v in medians.items():
            cpu = v["cpu_cores"]
            # Older results have no per-request figures.
            per = v.get("cpu_us_per_request")
            per_request = (
                " / ".join(
                    f"{per[name]:.0f}" for name in ("stream_service", "gateway", "nginx", "wrk")
                )
                if per
                else "-"
            )
            lines.append(
                f"| {kind} | {target} | {v['mb_per_s']} | {v['req_per_s']} | {v['x_nginx']} "
                f"| {v['p99_ms']} | {v['errors']} | {cpu['stream_service']} / {cpu['gateway']} "
                f"/ {cpu['nginx']} / {cpu['wrk']} | {per_request} |"
            )
    lines.append("")
    for kind, target, floor in TARGET_RATIOS:
        ratio = result["summary"][kind][target]["x_nginx"]
        verdict = "holds" if ratio >= floor else "FAILS"
        lines.append(f"- target {target} {kind} >= {floor}x nginx: {ratio}x, {verdict}")
    machine = result["machine"]
    lines.append(
        f"- machine: {machine['cpus']} cores, load average {machine['load_average_1m']} "
        "when the run began"
    )
    if result.get("sweep"):
        lines.append(
            f"- latency against load (1 MiB ranges, {SWEEP_SECONDS:g} s per point, "
            f"connections {', '.join(str(c) for c in SWEEP)}): streaming.png"
        )
    return lines
