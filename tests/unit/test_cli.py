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
