"""``make loadtest``: locust, headless and bounded, then a verdict on the thresholds.

    python loadtests/run.py [--start] [--host URL] [-u USERS] [-r RATE] [-t TIME]

Writes ``<results>/<prefix>_stats.csv`` (and locust's other CSVs), ``<prefix>.html`` and
``<prefix>.json`` (the final statistics),
then exits non-zero when

- more than ``--max-failure-ratio`` of all requests failed (default 1 %), or
- the 95th percentile of any metadata read (the video list, a video, its comments, its
  danmaku) is above ``--max-p95-ms`` (default 500 ms), or none was measured, or
- locust itself failed: a user's task raised (the locustfile exits 3 then), the target
  is not vod or could not be seeded (4, at once), or it could not run.

Locust's own "any failure is exit code 1" is turned off (``--exit-code-on-error 0``): a
429 or a rare failure under load is a ratio to judge, not a verdict. ``--start`` runs
``python -m standalone`` (the whole suite, embedded back ends, ./var of ``--stack-dir``)
for the run and stops it afterwards; without it nothing is started. ``--check-only``
judges the results of an earlier run. This script never imports locust (it patches the
standard library).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[1]
LOCUSTFILE: Final = Path(__file__).resolve().parent / "locustfile.py"
METADATA_READS: Final = (
    "/api/v1/videos",
    "/api/v1/videos/{id}",
    "/api/v1/videos/{id}/comments",
    "/api/v1/videos/{id}/danmaku",
)
DEFAULT_MAX_FAILURE_RATIO: Final = 0.01
DEFAULT_MAX_P95_MS: Final = 500.0
START_SECONDS: Final = 60.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtests/run.py", description=__doc__)
    parser.add_argument(
        "--host", default=os.environ.get("VOD_GATEWAY", "http://127.0.0.1:8000").rstrip("/")
    )
    parser.add_argument("-u", "--users", type=int, default=20)
    parser.add_argument("-r", "--spawn-rate", type=float, default=5)
    parser.add_argument("-t", "--run-time", default="60s")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--prefix", default="locust")
    parser.add_argument("--max-failure-ratio", type=float, default=DEFAULT_MAX_FAILURE_RATIO)
    parser.add_argument("--max-p95-ms", type=float, default=DEFAULT_MAX_P95_MS)
    parser.add_argument("--start", action="store_true", help="run the standalone stack too")
    parser.add_argument(
        "--stack-dir", type=Path, default=ROOT, help="where --start keeps its ./var"
    )
    parser.add_argument("--check-only", action="store_true", help="judge an earlier run")
    return parser.parse_args(argv)


# -- the stack -----------------------------------------------------------------------------


def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the standalone stack exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:  # noqa: S310
                if response.status == 200:  # noqa: PLR2004
                    return
        except OSError:
            pass
        time.sleep(0.2)  # polling a process we started but cannot hear from otherwise
    raise RuntimeError(f"{url} did not become healthy in {START_SECONDS:g} s")


@contextmanager
def standalone(host: str, folder: Path, log_path: Path) -> Iterator[None]:
    """``python -m standalone`` serving ``host`` (its port; the other services' ports and
    URLs from the VOD_* environment, as always) until the block ends, its data in
    ``folder``/var, its output (the access log) to ``log_path``."""
    port = str(urllib.parse.urlsplit(host).port or 80)
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "standalone"],
            cwd=folder,
            env={
                # Every locust user signs up from this one address: the per-address sign-up
                # limit (20 an hour by default) would stop a run of more users.
                "VOD_SIGNUP_RATE": "100000/3600",
                **os.environ,
                "VOD_GATEWAY_PORT": port,
                "PYTHONPATH": python_path,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(host, process)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- locust and the verdict ----------------------------------------------------------------


def run_locust(args: argparse.Namespace) -> int:
    args.results.mkdir(parents=True, exist_ok=True)
    prefix = args.results / args.prefix
    locust = Path(sys.executable).with_name("locust")
    command = [
        str(locust),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "-u",
        str(args.users),
        "-r",
        str(args.spawn_rate),
        "-t",
        args.run_time,
        "--stop-timeout",
        "15",
        "--host",
        args.host,
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
        "--json-file",  # locust adds ".json"
        str(prefix),
        "--exit-code-on-error",
        "0",
    ]
    print("loadtest:", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def percentile(response_times: dict[str, int], requests: int, fraction: float) -> float:
    """Locust's own percentile over its histogram (``{rounded ms: count}``)."""
    above_allowed = requests - int(requests * fraction)
    counted = 0
    histogram = sorted(((float(key), count) for key, count in response_times.items()), reverse=True)
    for milliseconds, count in histogram:
        counted += count
        if counted >= above_allowed:
            return milliseconds
    return 0.0


def verdict(args: argparse.Namespace) -> list[str]:
    """The thresholds crossed (empty when the run passes); prints what it judged. Reads
    locust's ``--json-file``, written once every user has stopped (the CSVs are written
    every second and may miss the last requests)."""
    entries = json.loads(Path(f"{args.results / args.prefix}.json").read_text())
    # locust prints no summary table when it writes the JSON: this is it.
    print(f"{'':8} {'route':44} {'requests':>8} {'failures':>8} {'p50 ms':>7} {'p95 ms':>7}")
    for entry in sorted(entries, key=lambda e: (e["name"], e["method"])):
        count = int(entry["num_requests"])
        p50, p95 = (percentile(entry["response_times"], count, f) for f in (0.5, 0.95))
        print(
            f"{entry['method']:8} {entry['name']:44} {count:8} {entry['num_failures']:8} "
            f"{p50:7g} {p95:7g}"
        )
    requests = sum(int(entry["num_requests"]) for entry in entries)
    failures = sum(int(entry["num_failures"]) for entry in entries)
    ratio = failures / requests if requests else 1.0
    print(f"loadtest: {failures} of {requests} requests failed ({ratio:.2%})")
    problems = []
    if ratio > args.max_failure_ratio:
        problems.append(f"failure ratio {ratio:.2%} > {args.max_failure_ratio:.2%}")
    reads = [e for e in entries if e["method"] == "GET" and e["name"] in METADATA_READS]
    for entry in reads:
        p95 = percentile(entry["response_times"], int(entry["num_requests"]), 0.95)
        print(f"loadtest: GET {entry['name']}: {entry['num_requests']} requests, p95 {p95:g} ms")
        if p95 > args.max_p95_ms:
            problems.append(f"p95 of GET {entry['name']} {p95:g} ms > {args.max_p95_ms:g} ms")
    if not reads:
        problems.append("no metadata read was measured")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.check_only:
        if args.start:
            args.results.mkdir(parents=True, exist_ok=True)
            log_path = args.results / f"{args.prefix}-standalone.log"
            with standalone(args.host, args.stack_dir, log_path):
                code = run_locust(args)
        else:
            code = run_locust(args)
        if code != 0:
            print(f"loadtest: locust exited with {code}", file=sys.stderr)
            return code
    problems = verdict(args)
    for problem in problems:
        print(f"loadtest: FAIL: {problem}", file=sys.stderr)
    if not problems:
        print(
            f"loadtest: PASS (failures <= {args.max_failure_ratio:.2%}, "
            f"metadata reads p95 <= {args.max_p95_ms:g} ms)"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
