"""Live danmaku fan-out: 1,000 WebSocket viewers of one video, senders at rising rates.

Two servers, measured one after the other in the same run with the same client harness:

- ``vod``: ``python -m api_service`` as in production (embedded SQLite and in-process bus,
  the real Redis on this machine when it answers, else the in-process one), viewers on
  ``GET /api/v1/videos/{id}/live`` straight to the api (the gateway hop is left out: it
  is a byte pump measured elsewhere), danmaku sent as ``POST .../danmaku`` with the
  gateway's internal token and identity headers, access logs at WARNING;
- ``bare``: the reference, a bare aiohttp app whose ``POST /send`` loops over its sockets
  awaiting ``send_str`` on each: what aiohttp alone does for a broadcast.

Each danmaku carries the sender's ``time.monotonic()`` (one clock for every process on
the machine); each viewer computes the delivery latency on arrival. The viewers live in
``CLIENT_PROCESSES`` child processes (``VOD_BENCH_DANMAKU_CLIENTS``, default 4; one
process holding all 1,000 sockets topped out near 25 danmaku/s: the client, not the
server, was the limit); the sender is the controlling process. A rate step lasts
``STEP_SECONDS``; "sustained" means every danmaku reached every viewer within the step's
drain time and p99 < 1 s. The bench client shares the 2 cores with the server: CPU of
both (client: sender plus viewer processes) is reported per step.

``python -m bench.danmaku --bare-server PORT`` runs the reference server (used internally).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson
import psutil
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench._harness import free_port, insert_video, machine, redis_reachable
from shared.auth import Identity

NAME: Final = "danmaku"
VIEWERS: Final = int(os.environ.get("VOD_BENCH_VIEWERS", "1000"))
# Steps at most 1.25x apart around where this machine's limits fall (25-75 danmaku/s): with
# 25, 50, 75 alone one step more or less, for either side, moved the ratio by 2x between
# runs of the same code (0.5x, 1.0x and 2.0x were measured in one hour).
RATES: Final = (10, 20, 25, 30, 35, 40, 50, 60, 75, 100, 125, 150, 200)
STEP_SECONDS: Final = float(os.environ.get("VOD_BENCH_STEP_SECONDS", "5"))
# Viewer processes: 1,000 sockets in one process could not keep up past ~25 danmaku/s.
CLIENT_PROCESSES: Final = int(os.environ.get("VOD_BENCH_DANMAKU_CLIENTS", "4"))
READY_SECONDS: Final = 120.0
TARGET_RATIO: Final = 0.7
DRAIN_SECONDS: Final = 3.0
P99_LIMIT: Final = 1.0
CREATED: Final = 201
REPORTED_RATE: Final = 10
ROOT: Final = Path(__file__).resolve().parents[1]
REDIS_URL: Final = os.environ.get("VOD_BENCH_REDIS", "redis://127.0.0.1:6379/0")
INTERNAL_TOKEN: Final = "bench-internal-token-" + secrets.token_hex(8)


# -- the reference server ------------------------------------------------------------------


def bare_server(port: int) -> None:
    sockets: set[web.WebSocketResponse] = set()

    async def live(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        sockets.add(ws)
        try:
            async for _ in ws:
                pass
        finally:
            sockets.discard(ws)
        return ws

    async def send(request: web.Request) -> web.Response:
        text = orjson.dumps({"type": "danmaku", **(await request.json())}).decode()
        for ws in list(sockets):
            try:
                await ws.send_str(text)
            except ConnectionError:
                continue
        return web.Response(status=201)

    app = web.Application()
    app.router.add_get("/live", live)
    app.router.add_post("/send", send)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- the harness -----------------------------------------------------------------------------


class Viewers:
    """The sockets of one viewer process and what they received since the last reset."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.received = 0

    async def watch(
        self,
        session: aiohttp.ClientSession,
        url: str,
        headers: dict[str, str],
        ready: asyncio.Event,
    ) -> None:
        async with session.ws_connect(url, headers=headers, compress=0, max_msg_size=0) as ws:
            ready.set()
            async for message in ws:
                body = orjson.loads(message.data)
                if body.get("type") == "danmaku":
                    self.latencies.append(time.monotonic() - float(body["content"]))
                    self.received += 1


def viewer_process(commands: Connection, url: str, headers: dict[str, str], count: int) -> None:
    """A child process holding ``count`` viewers of ``url``; answers the controller's
    commands: "reset" (forget what was received), "report" (what was received since, with
    this process's CPU %), "stop"."""
    asyncio.run(_viewer_loop(commands, url, headers, count))


async def _viewer_loop(commands: Connection, url: str, headers: dict[str, str], count: int) -> None:
    viewers = Viewers()
    me = psutil.Process()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        for _ in range(count):
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(viewers.watch(session, url, headers, ready)))
            await ready.wait()
        commands.send("ready")
        try:
            while (command := await asyncio.to_thread(commands.recv)) != "stop":
                if command == "reset":
                    viewers.latencies, viewers.received = [], 0
                    me.cpu_percent()
                    commands.send("reset")
                elif command == "report":
                    report = (viewers.received, viewers.latencies, me.cpu_percent())
                    commands.send(report)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class ViewerProcesses:
    """``VIEWERS`` viewers spread over ``CLIENT_PROCESSES`` processes (one process could
    not read more than ~25 danmaku/s for 1,000 sockets: the client was the bottleneck)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        shares = [VIEWERS // CLIENT_PROCESSES] * CLIENT_PROCESSES
        shares[0] += VIEWERS % CLIENT_PROCESSES
        for share in shares:
            mine, theirs = context.Pipe()
            process = context.Process(
                target=viewer_process, args=(theirs, url, headers, share), daemon=True
            )
            process.start()
            self.pipes.append(mine)
            self.processes.append(process)

    def ask(self, command: str) -> list[Any]:
        for pipe in self.pipes:
            pipe.send(command)
        return [pipe.recv() for pipe in self.pipes]

    def wait_ready(self) -> None:
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            if not pipe.poll(READY_SECONDS) or pipe.recv() != "ready":
                raise RuntimeError(f"viewer process {process.pid} did not connect its viewers")

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()


async def run_rates(
    live_url: str,
    send_url: str,
    headers: dict[str, str],
    viewer_headers: dict[str, str],
    pid: int,
) -> list[Any]:
    server = psutil.Process(pid)
    me = psutil.Process()
    steps: list[dict[str, Any]] = []
    viewers = ViewerProcesses(live_url, viewer_headers)
    try:
        await asyncio.to_thread(viewers.wait_ready)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as sender:
            # Warm up: a few danmaku, not measured.
            for i in range(20):
                await post(sender, send_url, headers, i)
            await asyncio.sleep(DRAIN_SECONDS)
            for rate in RATES:
                await asyncio.to_thread(viewers.ask, "reset")
                server.cpu_percent(), me.cpu_percent()
                sent = await send_at(sender, send_url, headers, rate)
                await asyncio.sleep(DRAIN_SECONDS)
                server_cpu, sender_cpu = server.cpu_percent(), me.cpu_percent()
                reports = await asyncio.to_thread(viewers.ask, "report")
                step = step_figures(rate, sent, reports)
                step["server_cpu_percent"] = round(server_cpu)
                step["client_cpu_percent"] = round(sender_cpu + sum(r[2] for r in reports))
                print(f"    {step}", flush=True)
                steps.append(step)
                if not step["sustained"]:
                    break
    finally:
        await asyncio.to_thread(viewers.stop)
    return steps


def step_figures(rate: int, sent: int, reports: list[Any]) -> dict[str, Any]:
    received = sum(report[0] for report in reports)
    lat = sorted(latency for report in reports for latency in report[1])
    expected = sent * VIEWERS
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)] if lat else None
    return {
        "rate": rate,
        "sent": sent,
        "expected_deliveries": expected,
        "deliveries": received,
        "deliveries_per_s": round(received / STEP_SECONDS),
        "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
        "p99_ms": round(1000 * p99, 1) if p99 is not None else None,
        "max_ms": round(1000 * lat[-1], 1) if lat else None,
        "sustained": bool(p99 is not None and received >= expected and p99 < P99_LIMIT),
    }


async def post(session: aiohttp.ClientSession, url: str, headers: dict[str, str], i: int) -> None:
    body = {
        "offset_ms": i % 1000,
        "content": f"{time.monotonic():.6f}",
        "mode": "scroll",
        "color": "#ffffff",
    }
    async with session.post(url, json=body, headers=headers) as response:
        if response.status != CREATED:
            raise RuntimeError(f"send failed: {response.status} {await response.text()}")


async def send_at(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], rate: int
) -> int:
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate * STEP_SECONDS)
    pending = []
    for i in range(total):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(post(session, url, headers, i)))
    await asyncio.gather(*pending)
    return total


def wait_healthy(url: str) -> None:
    for _ in range(300):
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:  # noqa: PLR2004
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become healthy")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure_vod(folder: Path) -> dict[str, Any]:
    db_url = f"sqlite+aiosqlite:///{folder}/vod.db"
    user_id, video_id = asyncio.run(insert_video(db_url, content_hash="0" * 64, size=1))
    port = free_port()
    key = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    redis_url = REDIS_URL if redis_reachable() else "memory://"
    env = os.environ | {
        "VOD_DB_URL": db_url,
        "VOD_REDIS_URL": redis_url,
        "VOD_AMQP_URL": "memory://",
        "VOD_BLOB_URL": f"file://{folder}/blobs",
        "VOD_API_URL": f"http://127.0.0.1:{port}",
        "VOD_STREAM_URL": "http://127.0.0.1:1",
        "VOD_SCHEDULER_URL": "http://127.0.0.1:1",
        "VOD_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "VOD_JWT_PRIVATE_KEY": key.decode(),
        "VOD_API_PORT": str(port),
        "VOD_NAMESPACE": f"vodbench_{secrets.token_hex(3)}",
        "VOD_DANMAKU_RATE": "1000000/1",
        "VOD_LOG_LEVEL": "WARNING",
        "VOD_SHUTDOWN_TIMEOUT": "2",
    }
    process = subprocess.Popen([sys.executable, "-m", "api_service"], cwd=ROOT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base + "/healthz")
        identity = Identity(user_id, "bench", "t", "f", int(time.time()) + 3600)
        headers = {"X-Internal-Token": INTERNAL_TOKEN, **identity.to_headers()}
        live_url = f"ws://127.0.0.1:{port}/api/v1/videos/{video_id}/live"
        send_url = f"{base}/api/v1/videos/{video_id}/danmaku"
        # Anonymous viewers, but past the internal-token check, as behind the gateway.
        viewer_headers = {"X-Internal-Token": INTERNAL_TOKEN}
        steps = asyncio.run(run_rates(live_url, send_url, headers, viewer_headers, process.pid))
    finally:
        stop(process)
    return {"redis": "real" if redis_url.startswith("redis") else "embedded", "steps": steps}


def measure_bare() -> dict[str, Any]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.danmaku", "--bare-server", str(port)], cwd=ROOT
    )
    try:
        for _ in range(300):
            try:
                with socket.create_connection(("127.0.0.1", port), 0.2):
                    break
            except OSError:
                time.sleep(0.05)
        steps = asyncio.run(
            run_rates(
                f"ws://127.0.0.1:{port}/live", f"http://127.0.0.1:{port}/send", {}, {}, process.pid
            )
        )
    finally:
        stop(process)
    return {"steps": steps}


def best(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    sustained = [s for s in steps if s["sustained"]]
    return max(sustained, key=lambda s: s["deliveries_per_s"]) if sustained else None


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vod-bench-danmaku-") as folder:
        vod = measure_vod(Path(folder))
    bare = measure_bare()
    vod_best, bare_best = best(vod["steps"]), best(bare["steps"])
    at_10 = {
        name: next((s for s in r["steps"] if s["rate"] == REPORTED_RATE), None)
        for name, r in (("vod", vod), ("bare", bare))
    }
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "viewers": VIEWERS,
        "step_seconds": STEP_SECONDS,
        "client_processes": CLIENT_PROCESSES,
        "machine": machine(),
        "cpus": os.cpu_count(),
        "vod": vod,
        "bare": bare,
        "vod_best": vod_best,
        "bare_best": bare_best,
        "at_10_per_s": at_10,
        "ratio_best_deliveries": (
            round(vod_best["deliveries_per_s"] / bare_best["deliveries_per_s"], 2)
            if vod_best and bare_best
            else None
        ),
    }


def summarize(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['viewers']} viewers of one video, {result['step_seconds']:g} s per rate step."
    ]
    for name in ("vod", "bare"):
        top = result.get(f"{name}_best")
        at10 = result["at_10_per_s"].get(name)
        if top:
            lines.append(
                f"- {name}: best sustained {top['deliveries_per_s']:,} deliveries/s at "
                f"{top['rate']} danmaku/s (p99 {top['p99_ms']} ms, server CPU "
                f"{top['server_cpu_percent']} %, client CPU {top['client_cpu_percent']} %)"
            )
        else:
            lines.append(f"- {name}: no rate sustained (every danmaku to every viewer, p99 < 1 s)")
        if at10:
            lines.append(f"  - at 10 danmaku/s: p50 {at10['p50_ms']} ms, p99 {at10['p99_ms']} ms")
    ratio = result.get("ratio_best_deliveries")
    verdict = "holds" if ratio is not None and ratio >= TARGET_RATIO else "FAILS"
    lines.append(
        f"- vod / bare best deliveries: {ratio if ratio is not None else 'n/a'}x "
        f"(target >= {TARGET_RATIO}x with p99 < 1 s: {verdict})"
    )
    lines.append(
        f"- viewers in {result.get('client_processes', 1)} client process(es); "
        "latency against load: danmaku.png"
    )
    return lines


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--bare-server":  # noqa: PLR2004
    bare_server(int(sys.argv[2]))
