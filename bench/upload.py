"""Upload throughput and stream_service memory: a 1 GiB file, 4 chunks in flight.

Two paths, one run each, every figure beside its reference measured in the same run:

- ``direct``: the client talks to ``python -m stream_service`` (internal token and
  identity headers, as the gateway would send them);
- ``gateway``: the same through ``python -m gateway`` with a signed access token.

Both processes run as in production on the embedded back ends (SQLite, in-process Redis
and bus) with blobs on local disk in a temporary folder. The file is generated chunk by
chunk (never held whole): a pass computes its content hash and chunk checksums, the timed
pass sends it. Throughput is MB/s (10^6 bytes, as ``dd`` prints) for the chunk PUTs alone,
and end to end including ``complete`` (which checks the content hash from the block
digests recorded as the chunks arrived and joins the chunks into the file: the disk
writes the bytes a second time). The reference is ``dd if=/dev/zero bs=8M
conv=fdatasync`` of the same number of bytes into the same folder (the same disk), twice
before and twice after; the ratios are to its median. Memory: resident set of each
service process sampled every 20 ms (psutil) and the kernel's peak (VmHWM), beside the
resident set just before the upload (after a warm-up upload).

CPU: user + system seconds of each process (stream_service, gateway, this client) for
the chunk PUTs alone, also per 100 MB, and for the whole upload; ``dd``'s own. The
machine's cores bound what any run can reach: with the three processes needing ``C``
core-seconds for the chunk PUTs and ``N`` cores, the PUTs take at least ``C / N``
seconds even with every core free and the disk never waited for; ``cpu_bound_mb_per_s``
is that ceiling, ``cpu_bound_vs_dd`` it over the ``dd`` median.
"""

from __future__ import annotations

import asyncio
import functools
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench._harness import Server as Service
from bench._harness import children_cpu, free_port, start, wait_ready
from shared.auth import TokenSigner
from shared.content_hash import ChunkDigests, content_hash_of_blocks
from shared.db import new_id
from vod_client.client import SEND_PIECE_BYTES

NAME: Final = "upload"

MIB: Final = 1024 * 1024
CHUNK: Final = 8 * MIB
# VOD_BENCH_UPLOAD_MIB picks another size: 2048 for the flat-memory figure of 2 GiB,
# smaller for quick comparisons; 1 GiB is the throughput figure beside dd.
FILE_BYTES: Final = int(os.environ.get("VOD_BENCH_UPLOAD_MIB", "1024")) * MIB
WARM_UP_BYTES: Final = 64 * MIB
PARALLEL: Final = 4
SAMPLE_SECONDS: Final = 0.02
# The same number of bytes as the upload, to the same disk.
DD_COMMAND: Final = "dd if=/dev/zero of={target} bs=8M count={count} conv=fdatasync"


# -- the file ------------------------------------------------------------------------------


class GeneratedFile:
    """``size`` bytes made chunk by chunk from one random block and a per-chunk header, so
    no two chunks (and no two runs' files, through ``salt``) are equal and no more than
    one chunk per sender is ever in memory."""

    def __init__(self, size: int, salt: int) -> None:
        self.size = size
        self.salt = salt
        self.total_chunks = -(-size // CHUNK)
        self._block = os.urandom(CHUNK)

    def fill(self, buffer: bytearray, index: int) -> memoryview:
        """Chunk ``index`` written into ``buffer`` (reused: first-touching fresh memory is
        slow here); the view is valid until the next fill."""
        length = min(CHUNK, self.size - index * CHUNK)
        buffer[:] = self._block
        buffer[:16] = self.salt.to_bytes(8, "big") + index.to_bytes(8, "big")
        return memoryview(buffer)[:length]

    def digests(self) -> tuple[str, list[str]]:
        """The content hash and each chunk's SHA-256: what a client computes first."""
        blocks: list[bytes] = []
        checksums = []
        buffer = bytearray(CHUNK)
        for index in range(self.total_chunks):
            digests = ChunkDigests()
            digests.update(self.fill(buffer, index))
            checksums.append(digests.hexdigest())
            blocks += digests.block_digests()
        return content_hash_of_blocks(blocks), checksums


# -- processes -----------------------------------------------------------------------------


def start_service(module: str, env: Mapping[str, str], port: int, work: Path) -> Service:
    return start(module, [sys.executable, "-m", module], env, f"http://127.0.0.1:{port}", work)


async def wait_healthy(service: Service, session: aiohttp.ClientSession) -> None:
    await wait_ready(service, "/healthz", session)


class RssSampler:
    """Samples the resident set of processes in a thread, every ``SAMPLE_SECONDS``."""

    def __init__(self, services: Mapping[str, Service]) -> None:
        self._processes = {name: service.process for name, service in services.items()}
        self.peaks = dict.fromkeys(services, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, process in self._processes.items():
                self.peaks[name] = max(self.peaks[name], process.memory_info().rss)
            self._stop.wait(SAMPLE_SECONDS)

    @contextmanager
    def running(self) -> Iterator[None]:
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()


# -- the client ----------------------------------------------------------------------------


async def pieces(chunk: memoryview) -> AsyncIterator[memoryview]:
    """The chunk as vod_client sends one: views of ``SEND_PIECE_BYTES``, no copy of its
    own (a ``BytesIO`` body cost the client two: into the BytesIO, and out in reads)."""
    for offset in range(0, len(chunk), SEND_PIECE_BYTES):
        yield chunk[offset : offset + SEND_PIECE_BYTES]


@dataclass
class Timings:
    chunks_seconds: float = 0.0
    complete_seconds: float = 0.0
    chunk_latencies: list[float] = field(default_factory=list)


async def upload(
    session: aiohttp.ClientSession,
    base_url: str,
    headers: Mapping[str, str],
    file: GeneratedFile,
    digests: tuple[str, list[str]],
    *,
    chunks_sent: Callable[[], None] = lambda: None,
) -> Timings:
    """Uploads ``file`` with ``PARALLEL`` chunks in flight; raises on any unexpected answer.

    ``digests`` is ``file.digests()``, computed beforehand as a client does (untimed);
    ``chunks_sent`` runs between the last chunk's answer and ``complete``.
    """
    content_hash, checksums = digests
    timings = Timings()
    started = time.perf_counter()
    async with session.post(
        f"{base_url}/api/v1/uploads",
        json={"filename": "bench.bin", "size": file.size, "content_hash": content_hash},
        headers=headers,
    ) as response:
        if response.status != 201:  # noqa: PLR2004
            raise RuntimeError(f"create: {response.status} {await response.text()}")
        upload_id = (await response.json())["upload_id"]
    indices: asyncio.Queue[int] = asyncio.Queue()
    for index in range(file.total_chunks):
        indices.put_nowait(index)

    async def sender() -> None:
        buffer = bytearray(CHUNK)
        while not indices.empty():
            index = indices.get_nowait()
            chunk = file.fill(buffer, index)
            sent = time.perf_counter()
            async with session.put(
                f"{base_url}/api/v1/uploads/{upload_id}/chunks/{index}",
                data=pieces(chunk),
                headers={
                    **headers,
                    "X-Chunk-SHA256": checksums[index],
                    "Content-Length": str(len(chunk)),
                },
            ) as response:
                if response.status != 204:  # noqa: PLR2004
                    raise RuntimeError(f"chunk {index}: {response.status} {await response.text()}")
            timings.chunk_latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(sender() for _ in range(PARALLEL)))
    timings.chunks_seconds = time.perf_counter() - started
    chunks_sent()
    completing = time.perf_counter()
    async with session.post(
        f"{base_url}/api/v1/uploads/{upload_id}/complete", headers=headers
    ) as response:
        body = await response.json()
        if response.status != 200 or body["content_hash"] != content_hash:  # noqa: PLR2004
            raise RuntimeError(f"complete: {response.status} {body}")
    timings.complete_seconds = time.perf_counter() - completing
    return timings


# -- the reference -------------------------------------------------------------------------


def dd_reference(folder: Path) -> dict[str, Any]:
    target = folder / "dd.bin"
    count = -(-FILE_BYTES // CHUNK)
    command = DD_COMMAND.format(target=target, count=count)
    cpu_before = children_cpu()
    started = time.perf_counter()
    completed = subprocess.run(command.split(), capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    cpu = children_cpu() - cpu_before
    target.unlink()
    written = count * CHUNK
    return {
        "command": command,
        "bytes": written,
        "seconds": round(seconds, 3),
        "mb_per_s": round(written / seconds / 1e6, 1),
        "cpu_seconds": round(cpu, 2),
        "dd_says": completed.stderr.strip().splitlines()[-1],
    }


# -- the run -------------------------------------------------------------------------------


def mb_per_s(size: int, seconds: float) -> float:
    return round(size / seconds / 1e6, 1)


def mib(size: int) -> float:
    return round(size / MIB, 1)


def cpu_now(services: Mapping[str, Service]) -> dict[str, float]:
    """User + system CPU seconds so far of each service and of this (the client) process."""
    processes = {name: service.process for name, service in services.items()}
    processes["client"] = psutil.Process()
    return {name: sum(process.cpu_times()[:2]) for name, process in processes.items()}


def record_cpu(into: dict[str, float], services: Mapping[str, Service]) -> None:
    into.update(cpu_now(services))


def spent(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before[name], 2) for name in before}


async def measure(work: Path) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    signer = TokenSigner(private_pem)
    stream_port, gateway_port = free_port(), free_port()
    internal_token = secrets.token_urlsafe(24)
    common = {
        "VOD_DB_URL": f"sqlite+aiosqlite:///{work}/vod.db",
        "VOD_DB_MIGRATE": "1",
        "VOD_REDIS_URL": "memory://",
        "VOD_AMQP_URL": "memory://",
        "VOD_BLOB_URL": f"file://{work}/blobs",
        "VOD_INTERNAL_TOKEN": internal_token,
        "VOD_HOST": "127.0.0.1",
        "VOD_API_URL": f"http://127.0.0.1:{stream_port}",
        "VOD_STREAM_URL": f"http://127.0.0.1:{stream_port}",
        "VOD_SCHEDULER_URL": f"http://127.0.0.1:{stream_port}",
        "VOD_STREAM_PORT": str(stream_port),
        "VOD_GATEWAY_PORT": str(gateway_port),
        "VOD_METRICS_PORT": str(free_port()),
        "VOD_JWT_PUBLIC_KEY": signer.public_key_pem(),
        "VOD_VAR_DIR": str(work / "var"),
        "VOD_LOG_LEVEL": "WARNING",
    }
    stream = start_service("stream_service", common, stream_port, work)
    gateway = start_service("gateway", common, gateway_port, work)
    services = {"stream_service": stream, "gateway": gateway}
    # One user on both paths; direct calls carry what the gateway would derive from the token.
    token, owner = signer.issue(user_id=new_id(), username="bench", family_id=new_id())
    paths = {
        "direct": (stream.url, {"X-Internal-Token": internal_token, **owner.to_headers()}),
        "gateway": (gateway.url, {"Authorization": f"Bearer {token}"}),
    }
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=300)
    runs = []
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for service in services.values():
                await wait_healthy(service, session)
            for salt, (path, (url, headers)) in enumerate(paths.items()):
                warm_up = GeneratedFile(WARM_UP_BYTES, 1000 + salt)
                await upload(session, url, headers, warm_up, warm_up.digests())
                file = GeneratedFile(FILE_BYTES, salt)
                digests = await asyncio.to_thread(file.digests)
                baseline = {name: s.process.memory_info().rss for name, s in services.items()}
                cpu_before = cpu_now(services)
                cpu_chunks: dict[str, float] = {}
                sampler = RssSampler(services)
                with sampler.running():
                    timings = await upload(
                        session,
                        url,
                        headers,
                        file,
                        digests,
                        chunks_sent=functools.partial(record_cpu, cpu_chunks, services),
                    )
                cpu = spent(cpu_before, cpu_now(services))
                chunks_cpu = spent(cpu_before, cpu_chunks)
                core_seconds = sum(chunks_cpu.values())
                total = timings.chunks_seconds + timings.complete_seconds
                latencies = sorted(timings.chunk_latencies)
                runs.append(
                    {
                        "path": path,
                        "chunks_seconds": round(timings.chunks_seconds, 2),
                        "chunks_mb_per_s": mb_per_s(FILE_BYTES, timings.chunks_seconds),
                        "complete_seconds": round(timings.complete_seconds, 2),
                        "end_to_end_seconds": round(total, 2),
                        "end_to_end_mb_per_s": mb_per_s(FILE_BYTES, total),
                        "chunk_latency_p50_s": round(latencies[len(latencies) // 2], 3),
                        "chunk_latency_max_s": round(latencies[-1], 3),
                        "rss_baseline_mib": {n: mib(v) for n, v in baseline.items()},
                        "rss_peak_mib": {n: mib(v) for n, v in sampler.peaks.items()},
                        "rss_growth_mib": {
                            n: mib(sampler.peaks[n] - baseline[n]) for n in services
                        },
                        "vm_hwm_mib": {n: mib(s.vm_hwm()) for n, s in services.items()},
                        "cpu_seconds": cpu,
                        "chunks_cpu_seconds": chunks_cpu,
                        "chunks_cpu_seconds_per_100_mb": {
                            name: round(seconds / (FILE_BYTES / 1e8), 3)
                            for name, seconds in chunks_cpu.items()
                        },
                        "cpu_bound_mb_per_s": mb_per_s(
                            FILE_BYTES, core_seconds / (os.cpu_count() or 1)
                        ),
                    }
                )
    finally:
        for service in services.values():
            service.stop()
    return {"runs": runs}


def run() -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="vod-bench-upload-"))
    try:
        # Twice before and twice after: this disk's speed swings by 2-5x between runs.
        references = [dd_reference(scratch) for _ in range(2)]
        measured = asyncio.run(measure(scratch))
        references += [dd_reference(scratch) for _ in range(2)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    dd = round(statistics.median(reference["mb_per_s"] for reference in references), 1)
    for entry in measured["runs"]:
        entry["chunks_vs_dd"] = round(entry["chunks_mb_per_s"] / dd, 2)
        entry["end_to_end_vs_dd"] = round(entry["end_to_end_mb_per_s"] / dd, 2)
        entry["cpu_bound_vs_dd"] = round(entry["cpu_bound_mb_per_s"] / dd, 2)
    return {
        "benchmark": NAME,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "scratch_disk": str(Path(tempfile.gettempdir())),
        },
        "file_bytes": FILE_BYTES,
        "chunk_bytes": CHUNK,
        "parallel_chunks": PARALLEL,
        "reference_dd_median_mb_per_s": dd,
        "reference_dd": references,
        "runs": measured["runs"],
    }


def summarize(result: dict[str, Any]) -> list[str]:
    dd = ", ".join(str(r["mb_per_s"]) for r in result["reference_dd"])
    dd_cpu = ", ".join(str(r.get("cpu_seconds", "?")) for r in result["reference_dd"])
    lines = [
        f"{result['file_bytes'] // MIB} MiB, {result['chunk_bytes'] // MIB} MiB chunks, "
        f"{result['parallel_chunks']} in flight. Reference `dd bs=8M conv=fdatasync` of as "
        f"many bytes on the same disk: median {result['reference_dd_median_mb_per_s']} MB/s "
        f"(runs: {dd}; two before, two after; dd's own CPU {dd_cpu} s).",
        "",
        "| path | chunks MB/s (x dd) | complete s | end to end MB/s (x dd) "
        "| stream_service RSS base → peak MiB (VmHWM) | gateway RSS base → peak MiB "
        "| CPU s stream / gateway / client | chunk PUTs: CPU s per 100 MB "
        "stream / gateway / client | CPU ceiling on "
        f"{result['machine']['cpus']} cores MB/s (x dd) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        base, peak, hwm = r["rss_baseline_mib"], r["rss_peak_mib"], r["vm_hwm_mib"]
        cpu, per = r["cpu_seconds"], r["chunks_cpu_seconds_per_100_mb"]
        lines.append(
            f"| {r['path']} | {r['chunks_mb_per_s']} ({r['chunks_vs_dd']}) "
            f"| {r['complete_seconds']} | {r['end_to_end_mb_per_s']} ({r['end_to_end_vs_dd']}) "
            f"| {base['stream_service']} → {peak['stream_service']} ({hwm['stream_service']}) "
            f"| {base['gateway']} → {peak['gateway']} "
            f"| {cpu['stream_service']} / {cpu['gateway']} / {cpu['client']} "
            f"| {per['stream_service']} / {per['gateway']} / {per['client']} "
            f"| {r['cpu_bound_mb_per_s']} ({r['cpu_bound_vs_dd']}) |"
        )
    return lines
