"""`make loadtest START=1` in small: loadtests/run.py starts a standalone stack of this
test's own (free ports, a temporary folder), runs locust against it for a few seconds and
judges the thresholds. Locust runs in a subprocess, never imported here: it patches the
standard library with gevent."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.processes import ROOT, free_port

pytestmark = pytest.mark.e2e

RUN_SCRIPT = ROOT / "loadtests" / "run.py"
# Every kind of user leaves its mark: the viewer streams and holds the live socket, the
# commenter posts, the uploader sends chunks and publishes.
EXPECTED_ROUTES = {
    ("GET", "/api/v1/videos"),
    ("GET", "/api/v1/videos/{id}"),
    ("GET", "/api/v1/videos/{id}/stream"),
    ("GET", "/api/v1/videos/{id}/comments"),
    ("GET", "/api/v1/videos/{id}/danmaku"),
    ("WS", "/api/v1/videos/{id}/live"),
    ("WS held", "/api/v1/videos/{id}/live"),
    ("POST", "/api/v1/videos/{id}/comments"),
    ("POST", "/api/v1/videos/{id}/danmaku"),
    ("PUT", "/api/v1/uploads/{id}/chunks/{id}"),
    ("POST", "/api/v1/videos"),
}


def loadtest(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN_SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_a_short_loadtest_passes_its_thresholds_and_writes_its_reports(tmp_path: Path) -> None:
    ports = {service: free_port() for service in ("gateway", "api", "stream", "scheduler")}
    upstreams = ("api", "stream", "scheduler")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **{f"VOD_{service.upper()}_PORT": str(port) for service, port in ports.items()},
        **{f"VOD_{s.upper()}_URL": f"http://127.0.0.1:{ports[s]}" for s in upstreams},
        "VOD_GATEWAY": f"http://127.0.0.1:{ports['gateway']}",
        # Short enough to fit the run: every viewer that joins the live channel leaves it.
        "LOADTEST_LIVE_SECONDS": "2",
        "LOADTEST_SEED_VIDEOS": "2",
    }
    results = tmp_path / "results"
    # Enough users that every class is spawned (weights 8:2:1), long enough that the
    # signed-up ones (an argon2 hash each) get to their first visit on a busy machine.
    # The latency threshold is loose: this run checks the machinery on a cold stack;
    # `make loadtest` holds the real one.
    run = loadtest(
        *("--start", "--stack-dir", str(tmp_path), "--results", str(results)),
        *("-u", "11", "-r", "11", "-t", "10s", "--max-p95-ms", "5000"),
        env=env,
    )

    assert run.returncode == 0, run.stdout + run.stderr
    assert "loadtest: PASS" in run.stdout
    final = json.loads((results / "locust.json").read_text())
    counts = {(entry["method"], entry["name"]): entry["num_requests"] for entry in final}
    assert counts.keys() >= EXPECTED_ROUTES, sorted(counts)
    # Every viewer's visit held the live channel to the end, and every request succeeded.
    assert counts["WS held", "/api/v1/videos/{id}/live"] == counts["WS", "/api/v1/videos/{id}/live"]
    assert sum(entry["num_failures"] for entry in final) == 0, final
    with (results / "locust_stats.csv").open(newline="") as file:
        assert "Aggregated" in {row["Name"] for row in csv.DictReader(file)}
    assert (results / "locust.html").read_text().lstrip().lower().startswith("<!doctype html")
    # The stack kept its data in the folder it was given, not in the checkout.
    assert (tmp_path / "var" / "vod.db").exists()

    # The same results judged against a threshold no server meets: the verdict is a failure.
    strict = loadtest("--check-only", "--results", str(results), "--max-p95-ms", "0", env=env)
    assert strict.returncode == 1
    assert "p95 of GET /api/v1/videos" in strict.stderr
