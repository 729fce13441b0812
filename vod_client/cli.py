"""``vod upload FILE --title TITLE``: upload a file and publish it.

``vod`` is the console script ``make install`` puts in ``.venv/bin`` (it runs outside the
venv, too); ``python -m vod_client`` is the same command from inside it.

Signs in with ``--username``/``--password`` (or ``VOD_USERNAME``/``VOD_PASSWORD``), or
uses the access token in ``VOD_TOKEN``. Sends ``--parallel`` chunks at once with a
progress bar on stderr, remembers the upload under ``~/.cache/vod`` (``VOD_CACHE_DIR``)
so that running the same command again after a kill sends only the missing chunks, and
prints the new video as JSON on stdout.

Exit codes: 0 done; 1 refused by the server; 2 bad usage; 3 not signed in (401);
4 too large for the limit or the quota (413); 5 gateway unreachable; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from shared.content_hash import BLOCK_SIZE
from vod_client.client import DEFAULT_PARALLEL, MIB, ApiError, OfflineError, VodClient
from vod_client.progress import ProgressBar
from vod_client.resume import ResumeStore, default_folder
from vod_client.source import FileSource

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAUTHORIZED: Final = 3
EXIT_TOO_LARGE: Final = 4
EXIT_OFFLINE: Final = 5
EXIT_INTERRUPTED: Final = 130
DEFAULT_URL: Final = "http://127.0.0.1:8000"
# The stream service's rule for a chunk size: whole blocks of the content hash (so each
# chunk's block digests are its own) and at least 8 MiB. Checked here, before hashing.
CHUNK_MIB_STEP: Final = BLOCK_SIZE // MIB
MIN_CHUNK_MIB: Final = 8
INSTANT_MESSAGE: Final = "already on the server: uploaded instantly"


class UsageError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="vod",
        description="Upload a video file to vod and publish it.",
        epilog=f"Chunks are a multiple of {CHUNK_MIB_STEP} MiB, at least {MIN_CHUNK_MIB} MiB "
        "(--chunk-mib); `vod upload --help` lists every option.",
    )
    commands = root.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload", help="upload a file and publish it as a video")
    upload.add_argument("file", type=Path)
    upload.add_argument("--title", required=True)
    upload.add_argument("--description", default="")
    upload.add_argument("--url", help=f"the gateway (VOD_URL; default {DEFAULT_URL})")
    upload.add_argument("--username", help="sign in as (VOD_USERNAME)")
    upload.add_argument("--password", help="(VOD_PASSWORD; asked for when missing)")
    upload.add_argument(
        "--parallel", type=int, default=DEFAULT_PARALLEL, help="chunks in flight (default 4)"
    )
    upload.add_argument(
        "--chunk-mib",
        type=int,
        default=MIN_CHUNK_MIB,
        help=f"chunk size in MiB: a multiple of {CHUNK_MIB_STEP}, at least {MIN_CHUNK_MIB} "
        f"(default {MIN_CHUNK_MIB})",
    )
    upload.add_argument("--no-resume", action="store_true", help="start over, remember nothing")
    upload.add_argument("--quiet", action="store_true", help="no progress bar")
    return root


def explain(error: ApiError | OfflineError) -> tuple[str, int]:
    """One line a person can act on, and the exit code."""
    if isinstance(error, OfflineError):
        return str(error), EXIT_OFFLINE
    if error.status == 401:  # noqa: PLR2004
        return f"not signed in ({error.code}): {error.detail}", EXIT_UNAUTHORIZED
    if error.code == "quota_exceeded":
        free = int(error.body.get("remaining_bytes", 0))
        quota = int(error.body.get("quota_bytes", 0))
        return (
            f"the file does not fit in your storage quota: {free / MIB:,.1f} MiB free of "
            f"{quota / MIB:,.1f} MiB. Delete videos or unfinished uploads to make room.",
            EXIT_TOO_LARGE,
        )
    if error.status == 413:  # noqa: PLR2004
        return f"the file is too large: {error.detail}", EXIT_TOO_LARGE
    if error.code == "chunk_checksum_mismatch":
        return "the file changed while it was being uploaded; run again", EXIT_REFUSED
    return f"the server refused ({error.status} {error.code}): {error.detail}", EXIT_REFUSED


async def upload_command(
    args: argparse.Namespace, env: Mapping[str, str], stderr: TextIO
) -> dict[str, Any]:
    url = args.url or env.get("VOD_URL") or DEFAULT_URL
    username = args.username or env.get("VOD_USERNAME")
    token = env.get("VOD_TOKEN")
    if not username and not token:
        raise UsageError("sign in with --username (or VOD_USERNAME), or set VOD_TOKEN")
    if args.parallel < 1:
        raise UsageError("--parallel must be at least 1")
    if args.chunk_mib < MIN_CHUNK_MIB or args.chunk_mib % CHUNK_MIB_STEP:
        raise UsageError(
            f"--chunk-mib must be a multiple of {CHUNK_MIB_STEP}, at least {MIN_CHUNK_MIB}"
        )
    try:
        source = FileSource(args.file)
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from exc
    with source:
        if not source.size:
            raise UsageError(f"{args.file} is empty")
        async with VodClient(url, token=None if username else token) as client:
            if username:
                password = args.password or env.get("VOD_PASSWORD") or getpass.getpass()
                await client.sign_in(username, password)
            else:
                # Before hashing what may be gigabytes: is the token (and the server) good?
                await client.request("GET", "/api/v1/users/me")
            bar: ProgressBar | None = None

            def on_size(total: int, already: int) -> None:
                nonlocal bar
                if not args.quiet:
                    bar = ProgressBar(total, stream=stderr)
                    bar.skip(already)
                    if already:
                        stderr.write(f"resuming: {already / MIB:,.1f} MiB already sent\n")

            def on_progress(count: int) -> None:
                if bar is not None:
                    bar.advance(count)

            if not args.quiet:
                stderr.write(f"hashing {args.file} ({source.size / MIB:,.1f} MiB)\n")
            result = await client.upload(
                source,
                chunk_size=args.chunk_mib * MIB,
                parallel=args.parallel,
                resume=None if args.no_resume else ResumeStore(default_folder(env)),
                on_size=on_size,
                on_progress=on_progress,
            )
            if result.instant:
                # Nothing was sent, only a proof of holding the bytes: a speed would be 0.
                if not args.quiet:
                    stderr.write(INSTANT_MESSAGE + "\n")
            elif bar is not None:
                bar.finish()
            return await client.create_video(
                upload_id=result.upload_id, title=args.title, description=args.description
            )


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    env = os.environ if env is None else env
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = parser().parse_args(argv)
    try:
        video = asyncio.run(upload_command(args, env, stderr))
    except UsageError as exc:
        stderr.write(f"vod: {exc}\n")
        return EXIT_USAGE
    except (ApiError, OfflineError) as exc:
        message, code = explain(exc)
        stderr.write(f"vod: {message}\n")
        return code
    except KeyboardInterrupt:
        stderr.write("\nvod: interrupted; run the same command again to resume\n")
        return EXIT_INTERRUPTED
    stdout.write(json.dumps(video) + "\n")
    return EXIT_OK
