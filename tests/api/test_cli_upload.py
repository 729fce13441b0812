"""The command-line uploader (``python -m vod_client upload``) and its client class, against
the whole stack in the test's loop. ``main`` runs in a thread with its own event loop, as it
would in its own process; the in-process stack keeps serving meanwhile."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.content_hash import content_hash
from shared.settings import Settings
from tests.clients import CHUNK, Uploader
from tests.stack import PASSWORD, Stack, start_stack
from vod_client import FileSource, ResumeStore, VodClient
from vod_client.cli import (
    EXIT_OFFLINE,
    EXIT_OK,
    EXIT_TOO_LARGE,
    EXIT_UNAUTHORIZED,
    EXIT_USAGE,
    main,
)
from vod_client.progress import ProgressBar

THREE_CHUNKS = 2 * CHUNK + 1000


class StopUploadError(Exception):
    """Stands in for a kill: the client stops between two chunks."""


@pytest.fixture
def film_data() -> bytes:
    return os.urandom(THREE_CHUNKS)


@pytest.fixture
def film(tmp_path: Path, film_data: bytes) -> Path:
    path = tmp_path / "film.mp4"
    path.write_bytes(film_data)
    return path


def remembered(cache: Path) -> list[Path]:
    """The resume files left in ``cache``."""
    return list(cache.glob("upload-*.json"))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def gateway_url(stack: Stack) -> str:
    return str(stack.gateway.make_url("")).rstrip("/")


async def run_cli(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, list(argv), env=env, stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


async def signed_up(stack: Stack) -> str:
    username: str = (await stack.sign_up())["username"]
    return username


async def test_upload_publishes_the_file_with_a_progress_bar(
    stack: Stack, film: Path, film_data: bytes, cache: Path
) -> None:
    username = await signed_up(stack)
    env = {"VOD_USERNAME": username, "VOD_PASSWORD": PASSWORD, "VOD_CACHE_DIR": str(cache)}
    code, out, err = await run_cli(
        "upload", str(film), "--title", "My film", "--description", "Shot on a phone",
        "--url", gateway_url(stack), env=env,
    )  # fmt: skip

    assert code == EXIT_OK, err
    video = json.loads(out)
    assert (video["title"], video["description"]) == ("My film", "Shot on a phone")
    assert video["content_hash"] == content_hash(film_data)
    assert "100%" in err
    assert "MB/s" in err
    # Done: nothing left to resume.
    assert not remembered(cache)
    stream = await stack.gateway.get(f"/api/v1/videos/{video['id']}/stream")
    assert await stream.read() == film_data


async def test_a_stopped_upload_resumes_sending_only_the_missing_chunks(
    stack: Stack, film: Path, film_data: bytes, cache: Path
) -> None:
    auth = await stack.new_user()
    uploader = Uploader(stack, auth)
    store = ResumeStore(cache)

    async def stop_after_first(index: int) -> None:
        raise StopUploadError(index)

    with FileSource(film) as source:
        with pytest.raises(ExceptionGroup) as stopped:
            await uploader.client().upload(
                source, parallel=1, resume=store, after_chunk=stop_after_first
            )
        assert stopped.group_contains(StopUploadError)
        hashed = content_hash(film_data)
        remembered = store.load(gateway_url(stack), hashed)
        assert remembered is not None
        assert (await uploader.status(remembered["upload_id"]))["missing"] == [1, 2]

        progress: list[tuple[int, int]] = []
        result = await uploader.client().upload(
            source, resume=store, on_size=lambda total, done: progress.append((total, done))
        )

    assert result.resumed
    assert result.upload_id == remembered["upload_id"]
    assert sorted(result.sent_chunks) == [1, 2]
    assert progress == [(THREE_CHUNKS, CHUNK)]
    assert result.content_hash == hashed
    assert store.load(gateway_url(stack), hashed) is None


async def test_a_file_the_server_has_goes_up_instantly_with_a_proof(
    stack: Stack, film: Path
) -> None:
    first = Uploader(stack, await stack.new_user())
    second = Uploader(stack, await stack.new_user())
    with FileSource(film) as source:
        await first.client().upload(source)
        result = await second.client().upload(source)
    assert result.instant
    assert result.sent_chunks == ()
    assert (await second.status(result.upload_id))["state"] == "complete"


async def test_a_file_the_server_has_is_reported_as_uploaded_instantly(
    stack: Stack, film: Path, film_data: bytes, cache: Path
) -> None:
    first = Uploader(stack, await stack.new_user())
    with FileSource(film) as source:
        await first.client().upload(source)
    username = await signed_up(stack)
    code, out, err = await run_cli(
        "upload", str(film), "--title", "Again", "--url", gateway_url(stack),
        env={"VOD_USERNAME": username, "VOD_PASSWORD": PASSWORD, "VOD_CACHE_DIR": str(cache)},
    )  # fmt: skip

    assert code == EXIT_OK, err
    # Nothing was sent: no speed (it would read "0.0 MB/s"), one line saying why.
    assert err.splitlines()[-1] == "already on the server: uploaded instantly"
    assert "MB/s" not in err
    video = json.loads(out)
    assert video["title"] == "Again"
    stream = await stack.gateway.get(f"/api/v1/videos/{video['id']}/stream")
    assert await stream.read() == film_data


async def test_a_forgotten_upload_on_the_server_starts_over(
    stack: Stack, film: Path, film_data: bytes, cache: Path
) -> None:
    uploader = Uploader(stack, await stack.new_user())
    store = ResumeStore(cache)
    hashed = content_hash(film_data)
    store.save(gateway_url(stack), hashed, {"upload_id": "01NOSUCHUPLOAD", "size": THREE_CHUNKS})
    with FileSource(film) as source:
        result = await uploader.client().upload(source, resume=store)
    assert not result.resumed
    assert sorted(result.sent_chunks) == [0, 1, 2]


async def test_problems_become_one_line_and_an_exit_code(
    stack: Stack, film: Path, cache: Path
) -> None:
    username = await signed_up(stack)
    base = {"VOD_CACHE_DIR": str(cache)}
    command = ("upload", str(film), "--title", "t", "--url", gateway_url(stack))

    code, _, err = await run_cli(*command, env=base)
    assert (code, err) == (EXIT_USAGE, "vod: sign in with --username (or VOD_USERNAME), or set "
                           "VOD_TOKEN\n")  # fmt: skip

    code, _, err = await run_cli(*command, "--username", username, "--password", "wrong-pw-123",
                                 env=base)  # fmt: skip
    assert code == EXIT_UNAUTHORIZED
    assert err.startswith("vod: not signed in (invalid_credentials)")

    code, _, err = await run_cli(*command, env=base | {"VOD_TOKEN": "not-a-token"})
    assert code == EXIT_UNAUTHORIZED, err

    code, _, err = await run_cli(
        "upload", str(film), "--title", "t", "--url", "http://127.0.0.1:9",
        env=base | {"VOD_TOKEN": "x"},
    )  # fmt: skip
    assert code == EXIT_OFFLINE
    assert err.startswith("vod: cannot reach http://127.0.0.1:9")

    code, _, err = await run_cli(*command[:1], str(film.with_name("absent.mp4")), *command[2:],
                                 env=base | {"VOD_TOKEN": "x"})  # fmt: skip
    assert code == EXIT_USAGE
    assert "cannot read" in err


async def test_over_quota_says_how_much_is_free(
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    film: Path,
    cache: Path,
) -> None:
    stack = await start_stack(
        make_settings(VOD_USER_QUOTA_BYTES=str(2 * 1024 * 1024)), aiohttp_server, aiohttp_client
    )
    username = await signed_up(stack)
    code, out, err = await run_cli(
        "upload", str(film), "--title", "t", "--url", gateway_url(stack), "--quiet",
        env={"VOD_USERNAME": username, "VOD_PASSWORD": PASSWORD, "VOD_CACHE_DIR": str(cache)},
    )  # fmt: skip
    assert (code, out) == (EXIT_TOO_LARGE, "")
    assert err == (
        "vod: the file does not fit in your storage quota: 2.0 MiB free of 2.0 MiB. "
        "Delete videos or unfinished uploads to make room.\n"
    )


def test_the_progress_bar_shows_bytes_speed_and_time_left() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = ProgressBar(100 * 1024 * 1024, stream=out, clock=lambda: now[0], interactive=False)
    bar.skip(20 * 1024 * 1024)
    now[0] = 2.0
    bar.advance(20 * 1024 * 1024)
    # 20 MiB in 2 s by this run; 60 MiB left at that speed: 6 s.
    assert out.getvalue() == (
        "[#########...............]  40% 40.0/100.0 MiB 10.5 MB/s 0:00:06 left\n"
    )


async def test_the_client_reports_an_unreachable_gateway() -> None:
    async with VodClient("http://127.0.0.1:9") as client:
        with pytest.raises(Exception, match="cannot reach"):
            await client.sign_in("someone", "password")
