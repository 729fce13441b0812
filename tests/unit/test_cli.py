"""Each service refuses to start on bad configuration with one line naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module", ["gateway", "api_service", "stream_service", "scheduler_service"]
)
def test_service_exits_with_one_line_naming_the_variable(module: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "VOD_DB_URL": "postgres://nope"}
    result = subprocess.run(
        [sys.executable, "-m", module],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "VOD_DB_URL" in lines[0]


@pytest.mark.parametrize(
    ("module", "variable"),
    [("api_service", "VOD_JWT_PRIVATE_KEY"), ("gateway", "VOD_JWT_PUBLIC_KEY")],
)
def test_services_mode_refuses_to_start_without_its_jwt_key(module: str, variable: str) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "VOD_DB_URL": "sqlite+aiosqlite:///unused.db",
        "VOD_REDIS_URL": "memory://",
        "VOD_AMQP_URL": "memory://",
        "VOD_BLOB_URL": "file:///tmp/unused",
        "VOD_API_URL": "http://127.0.0.1:1",
        "VOD_STREAM_URL": "http://127.0.0.1:1",
        "VOD_SCHEDULER_URL": "http://127.0.0.1:1",
        "VOD_INTERNAL_TOKEN": "a-long-random-internal-secret",
    }
    result = subprocess.run(
        [sys.executable, "-m", module],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    service = module.removesuffix("_service")
    assert result.stderr.strip().splitlines() == [
        f"{service}: configuration error: {variable}: is required but not set"
    ]


def test_a_placeholder_key_is_refused_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway"],
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "VOD_DB_URL": "sqlite+aiosqlite:///unused.db",
            "VOD_REDIS_URL": "memory://",
            "VOD_AMQP_URL": "memory://",
            "VOD_BLOB_URL": "file:///tmp/unused",
            "VOD_API_URL": "http://127.0.0.1:1",
            "VOD_STREAM_URL": "http://127.0.0.1:1",
            "VOD_SCHEDULER_URL": "http://127.0.0.1:1",
            "VOD_INTERNAL_TOKEN": "a-long-random-internal-secret",
            "VOD_JWT_PUBLIC_KEY": "changeme",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "VOD_JWT_PUBLIC_KEY" in result.stderr
