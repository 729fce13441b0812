"""Each service refuses to start on bad configuration with one line naming the variable;
the ``vod`` upload command's entry point and its help."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.processes import ROOT


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


def _console_script(name: str) -> Callable[..., Any]:
    """What the console script ``name`` that pyproject.toml declares calls."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attribute = scripts[name].partition(":")
    entry: Callable[..., Any] = getattr(importlib.import_module(module), attribute)
    return entry


@pytest.mark.parametrize("argv", [["--help"], ["upload", "--help"]])
def test_the_vod_script_states_the_chunk_size_rule_in_its_help(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        _console_script("vod")(argv)
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert help_text.startswith("usage: vod ")
    assert "a multiple of 4" in help_text
    assert "at least 8" in help_text


def test_the_vod_script_refuses_a_chunk_size_off_the_rule(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    film = tmp_path / "film.mp4"
    film.write_bytes(b"x")
    code = _console_script("vod")(
        ["upload", str(film), "--title", "t", "--chunk-mib", "6"], env={"VOD_TOKEN": "t"}
    )
    assert code == 2
    assert capsys.readouterr().err == "vod: --chunk-mib must be a multiple of 4, at least 8\n"
