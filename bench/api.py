"""Metadata reads: cached ``GET /api/v1/videos/{id}`` through the gateway, against a bare
aiohttp proxy in front of a bare aiohttp JSON handler serving the same bytes.

Four targets, measured in one run, interleaved (a, b, c, d, a, ...) so the host's drift
hits all alike; figures are medians of ``REPEATS``:

- ``gateway``: ``python -m gateway`` in front of ``python -m api_service`` as in
  production (embedded SQLite, the real Redis on this machine for the read-through cache
  when it answers, else the in-process one; access logs at WARNING), one video, read
  anonymously: after the first read every answer comes from the cache;
- ``api``: ``python -m api_service`` alone, with the gateway's internal token (context:
  what the gateway hop costs);
- ``bare_proxy``: the reference, a bare aiohttp app forwarding every request through one
  shared ``ClientSession`` to ``bare``;
- ``bare``: a bare aiohttp app answering the very JSON bytes the gateway returned.

Both references are written here (``python -m bench.api --bare-server PORT FILE`` and
``--bare-proxy PORT UPSTREAM``), not in the product. Load: wrk, one thread, ``-c 16``.
CPU of every process (wrk's included) beside each figure: the load tool shares the two
cores with the servers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from bench._harness import (
    ROOT,
    WRK_DONE,
    Server,
    ensure_debian_tool,
    free_port,
    insert_video,
    machine,
    median_of,
    now_iso,
    redis_reachable,
    run_wrk,
    signing_key_pair,
    start,
    wait_ready,
)

NAME: Final = "api"
SECONDS: Final = float(os.environ.get("VOD_BENCH_API_SECONDS", "5"))
REPEATS: Final = int(os.environ.get("VOD_BENCH_API_REPEATS", "3"))
WARM_UP_SECONDS: Final = 2.0
CONNECTIONS: Final = 16
TARGETS: Final = ("gateway", "api", "bare_proxy", "bare")
REFERENCE: Final = "bare_proxy"
REDIS_URL: Final = os.environ.get("VOD_BENCH_REDIS", "redis://127.0.0.1:6379/0")
# Below this a process only idled through a run (health checks): left out of the table.
IDLE_US_PER_REQUEST: Final = 5

WRK_SCRIPT: Final = (
    """\
local token = os.getenv("BENCH_INTERNAL_TOKEN")
if token and token ~= "" then wrk.headers["X-Internal-Token"] = token end
"""
    + WRK_DONE
)


# -- the references --------------------------------------------------------------------------


def bare_server(port: int, body_path: Path) -> None:
    """One handler, one answer: the JSON bytes, as a JSON document."""
    body = body_path.read_bytes()

    async def video(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/v1/videos/{id}", video)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def bare_proxy(port: int, upstream: str) -> None:
    """Forwards each GET to ``upstream`` with one shared ``ClientSession``; copies the
    status, the content type and the body (read whole: ~1 KiB of JSON)."""
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def open_session(app: web.Application) -> Any:
        app[session_key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[session_key].close()

    async def forward(request: web.Request) -> web.Response:
        async with request.app[session_key].get(upstream + request.path_qs) as response:
            return web.Response(
                status=response.status,
                body=await response.read(),
                content_type=response.content_type,
            )

    app = web.Application()
    app.cleanup_ctx.append(open_session)
    app.router.add_get("/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- the run -------------------------------------------------------------------------------


def median_cpu_per_request(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each process's median CPU µs per request over ``runs`` of one target."""
    return {
        name: statistics.median(run["cpu_us_per_request"][name] for run in runs)
        for name in runs[0]["cpu_us_per_request"]
    }


async def start_servers(work: Path, token: str) -> tuple[dict[str, Server], dict[str, str]]:
    db_url = f"sqlite+aiosqlite:///{work}/vod.db"
    _, video_id = await insert_video(db_url, content_hash="0" * 64, size=1)
    path = f"/api/v1/videos/{video_id}"
    private, public = signing_key_pair()
    ports = {name: free_port() for name in TARGETS}
    redis_url = REDIS_URL if redis_reachable() else "memory://"
    env = {
        "VOD_DB_URL": db_url,
        "VOD_REDIS_URL": redis_url,
        "VOD_AMQP_URL": "memory://",
        "VOD_BLOB_URL": f"file://{work}/blobs",
        "VOD_INTERNAL_TOKEN": token,
        "VOD_JWT_PRIVATE_KEY": private,
        "VOD_JWT_PUBLIC_KEY": public,
        "VOD_HOST": "127.0.0.1",
        "VOD_API_PORT": str(ports["api"]),
        "VOD_GATEWAY_PORT": str(ports["gateway"]),
        "VOD_METRICS_PORT": str(free_port()),
        "VOD_API_URL": f"http://127.0.0.1:{ports['api']}",
        "VOD_STREAM_URL": "http://127.0.0.1:1",
        "VOD_SCHEDULER_URL": "http://127.0.0.1:1",
        "VOD_NAMESPACE": f"vodbench_{secrets.token_hex(3)}",
        "VOD_VAR_DIR": str(work / "var"),
        "VOD_LOG_LEVEL": "WARNING",
    }
    python = sys.executable
    servers = {
        "api": start(
            "api", [python, "-m", "api_service"], env, f"http://127.0.0.1:{ports['api']}", work
        ),
        "gateway": start(
            "gateway", [python, "-m", "gateway"], env, f"http://127.0.0.1:{ports['gateway']}", work
        ),
    }
    urls = {"gateway": servers["gateway"].url + path, "api": servers["api"].url + path}
    async with aiohttp.ClientSession() as session:
        await wait_ready(servers["api"], "/healthz", session)
        await wait_ready(servers["gateway"], "/healthz", session)
        async with session.get(urls["gateway"]) as response:
            if response.status != 200:  # noqa: PLR2004
                raise RuntimeError(f"gateway: {response.status} {await response.text()}")
            body = await response.read()
    body_path = work / "video.json"
    body_path.write_bytes(body)
    bare_argv = [python, "-m", "bench.api"]
    servers["bare"] = start(
        "bare",
        [*bare_argv, "--bare-server", str(ports["bare"]), str(body_path)],
        {"PYTHONPATH": str(ROOT)},
        f"http://127.0.0.1:{ports['bare']}",
        work,
    )
    servers["bare_proxy"] = start(
        "bare_proxy",
        [*bare_argv, "--bare-proxy", str(ports["bare_proxy"]), servers["bare"].url],
        {"PYTHONPATH": str(ROOT)},
        f"http://127.0.0.1:{ports['bare_proxy']}",
        work,
    )
    urls["bare"] = servers["bare"].url + path
    urls["bare_proxy"] = servers["bare_proxy"].url + path
    async with aiohttp.ClientSession() as session:
        await wait_ready(servers["bare"], path, session)
        await wait_ready(servers["bare_proxy"], path, session)
        for name in ("api", "bare", "bare_proxy"):  # the same bytes everywhere
            headers = {"X-Internal-Token": token} if name == "api" else {}
            async with session.get(urls[name], headers=headers) as response:
                if response.status != 200 or await response.read() != body:  # noqa: PLR2004
                    raise RuntimeError(f"{name} does not answer what the gateway answers")
    return servers, urls


def measure_once(
    wrk: str, script: Path, *, target: str, url: str, token: str, servers: dict[str, Server]
) -> dict[str, Any]:
    before = {name: s.cpu_seconds() for name, s in servers.items()}
    summary = run_wrk(
        wrk,
        script,
        url,
        connections=CONNECTIONS,
        seconds=SECONDS,
        env={"BENCH_INTERNAL_TOKEN": token if target == "api" else ""},
    )
    seconds = summary["duration_us"] / 1e6
    used = {name: s.cpu_seconds() - before[name] for name, s in servers.items()}
    used["wrk"] = summary["cpu_seconds"]
    cpu = {name: value / seconds for name, value in used.items()}
    requests = max(summary["requests"], 1)
    return {
        "target": target,
        "requests": summary["requests"],
        "errors": summary["errors"],
        "req_per_s": round(summary["requests"] / seconds),
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "cpu_cores": {name: round(value, 2) for name, value in cpu.items()},
        # What each request cost each process: the figure to judge a change by on a
        # shared machine, where req/s moves with everyone else's load.
        "cpu_us_per_request": {name: round(value / requests * 1e6) for name, value in used.items()},
    }


def run() -> dict[str, Any]:
    wrk = ensure_debian_tool("wrk", "wrk")
    work = Path(tempfile.mkdtemp(prefix="vod-bench-api-"))
    token = secrets.token_urlsafe(24)
    servers: dict[str, Server] = {}
    runs: list[dict[str, Any]] = []
    started_on = machine()
    cache = "real Redis" if redis_reachable() else "in-process (no Redis on 6379)"
    try:
        script = work / "bench.lua"
        script.write_text(WRK_SCRIPT)
        servers, urls = asyncio.run(start_servers(work, token))
        body_bytes = (work / "video.json").stat().st_size
        for target in TARGETS:  # caches, pools, first-touch memory
            run_wrk(
                wrk,
                script,
                urls[target],
                connections=CONNECTIONS,
                seconds=WARM_UP_SECONDS,
                env={"BENCH_INTERNAL_TOKEN": token if target == "api" else ""},
            )
        for _ in range(REPEATS):
            for target in TARGETS:
                runs.append(
                    measure_once(
                        wrk, script, target=target, url=urls[target], token=token, servers=servers
                    )
                )
                print(f"    {runs[-1]}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    medians = {
        target: median_of(
            [r for r in runs if r["target"] == target], ("req_per_s", "p50_ms", "p99_ms")
        )
        for target in TARGETS
    }
    for target, values in medians.items():
        values["cpu_us_per_request"] = median_cpu_per_request(
            [r for r in runs if r["target"] == target]
        )
    reference = medians[REFERENCE]["req_per_s"]
    for values in medians.values():
        values["x_bare_proxy"] = round(values["req_per_s"] / reference, 2)
    return {
        "benchmark": NAME,
        "measured_at": now_iso(),
        "machine": started_on,
        "seconds_per_run": SECONDS,
        "repeats": REPEATS,
        "connections": CONNECTIONS,
        "load_tool": "wrk -t1",
        "cache": cache,
        "body_bytes": body_bytes,
        "target": {"gateway_x_bare_proxy": 0.8},
        "summary": medians,
        "runs": runs,
    }


def summarize(result: dict[str, Any]) -> list[str]:
    medians = result["summary"]
    ratio = medians["gateway"]["x_bare_proxy"]
    holds = "holds" if ratio >= result["target"]["gateway_x_bare_proxy"] else "FAILS"
    lines = [
        f"Cached `GET /api/v1/videos/{{id}}` (~{result['body_bytes']} B JSON); "
        f"{result['load_tool']} -c {result['connections']}, {result['seconds_per_run']:g} s "
        f"per run, median of {result['repeats']} interleaved runs. Reference: a bare aiohttp "
        "proxy (shared ClientSession) in front of a bare aiohttp JSON handler, same bytes.",
        "",
        f"**gateway / bare proxy: {ratio}x** (target >= "
        f"{result['target']['gateway_x_bare_proxy']}x: {holds})",
        "",
        "| target | req/s | x bare proxy | p50 ms | p99 ms | errors | CPU cores busy "
        "| CPU µs per request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target, v in medians.items():
        cpu = ", ".join(f"{name} {value}" for name, value in v["cpu_cores"].items() if value)
        per_request = ", ".join(
            f"{name} {value}"
            for name, value in v.get("cpu_us_per_request", {}).items()
            if value >= IDLE_US_PER_REQUEST
        )
        lines.append(
            f"| {target} | {v['req_per_s']:,.0f} | {v['x_bare_proxy']} | {v['p50_ms']} "
            f"| {v['p99_ms']} | {v['errors']} | {cpu} | {per_request or '-'} |"
        )
    lines += [
        "",
        f"Machine: {result['machine']['cpus']} cores, load average "
        f"{result['machine']['load_average_1m']} when the run began.",
    ]
    return lines


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--bare-server":  # noqa: PLR2004
    bare_server(int(sys.argv[2]), Path(sys.argv[3]))
elif __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--bare-proxy":  # noqa: PLR2004
    bare_proxy(int(sys.argv[2]), sys.argv[3])
