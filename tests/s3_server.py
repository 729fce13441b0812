"""An S3 server for tests: moto's standalone server in a child process, or a real one.

``serve_s3`` runs for a whole session (``tests/conftest.py`` exposes it as the session
fixture ``s3_server``): one bucket named for the run, emptied and deleted at the end.
``VOD_TEST_S3=http://KEY:SECRET@host:port`` points the run at a real S3-compatible server
(MinIO, say) instead of moto. Tests give themselves a key prefix of their own in the bucket
(an ``s3://`` blob URL's path), so they never meet.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

if TYPE_CHECKING:
    from aiobotocore.session import ClientCreatorContext
    from types_aiobotocore_s3.client import S3Client


# A real S3-compatible server instead of moto's: VOD_TEST_S3=http://KEY:SECRET@host:9000
# (MinIO, say). The run makes its own bucket there and deletes it at the end.
S3_URL = os.environ.get("VOD_TEST_S3")
S3_ACCESS_KEY = "vodtest"
S3_SECRET_KEY = "vodtest/secret+key"  # a "/" and a "+" to prove URL-decoding
S3_REGION = "us-east-1"
# Run in a child process: the server's threads then never share this process's GIL or
# count in its memory measurements, and binding port 0 there avoids a free-port race.
# It prints its port, then serves until its stdin closes.
MOTO_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key: str = S3_ACCESS_KEY
    secret_key: str = S3_SECRET_KEY

    @property
    def credentials(self) -> tuple[str, str]:
        return (self.access_key, self.secret_key)

    def url(self, prefix: str, *, credentials: bool = True) -> str:
        userinfo = f"{quote(self.access_key, safe='')}:{quote(self.secret_key, safe='')}@"
        return (
            f"s3://{userinfo if credentials else ''}{self.bucket}/{prefix}"
            f"?endpoint={self.endpoint}&region={S3_REGION}"
        )

    def admin(self) -> ClientCreatorContext[S3Client]:
        """A plain S3 client (``async with``), to see what the store cannot show."""
        return _admin_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=S3_REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=AioConfig(s3={"addressing_style": "path"}),
        )


@functools.cache
def _admin_session() -> AioSession:
    return AioSession()  # loads S3's service model once for the run, not once per test


@contextmanager
def serve_s3(run_id: str, log_dir: Path) -> Iterator[S3Server]:
    """The run's S3 server with its bucket ``vodtest-<run id>``; both gone at the end."""
    bucket = f"vodtest-{run_id}"
    if S3_URL:
        parts = urlsplit(S3_URL)
        endpoint = f"{parts.scheme}://{parts.hostname}:{parts.port or 9000}"
        from tests.conftest import require  # here: conftest imports this module

        require(endpoint, 9000, "the S3 server of VOD_TEST_S3")  # named without its keys
        server = S3Server(
            endpoint,
            bucket,
            unquote(parts.username or ""),
            unquote(parts.password or ""),
        )
        run_aside(_create_bucket(server))
        yield server
        run_aside(_delete_bucket(server))
        return
    log = log_dir / "moto-server.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", MOTO_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        port = process.stdout.readline().strip()
        if not port.isdigit():
            pytest.fail(f"moto's server did not start: {log.read_text()[-2000:]}")
        server = S3Server(f"http://127.0.0.1:{int(port)}", bucket)
        run_aside(_create_bucket(server))
        yield server
        run_aside(_delete_bucket(server))
    finally:
        process.stdin.close()
        process.stdout.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_aside(coroutine: Coroutine[Any, Any, None]) -> None:
    """Runs ``coroutine`` to its end on a loop of its own, in a thread of its own.

    The session fixture may be set up from inside a test's running loop (an async fixture
    asked for it), where ``asyncio.run`` is refused.
    """
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, coroutine).result()


async def _create_bucket(server: S3Server) -> None:
    async with server.admin() as s3:
        await s3.create_bucket(Bucket=server.bucket)


async def _delete_bucket(server: S3Server) -> None:
    async with server.admin() as s3:
        await empty_prefix(s3, server.bucket, "")
        await s3.delete_bucket(Bucket=server.bucket)


async def empty_prefix(s3: S3Client, bucket: str, prefix: str) -> None:
    for key in await object_keys(s3, bucket, prefix):
        await s3.delete_object(Bucket=bucket, Key=key)
    for key, upload_id in await unfinished_uploads(s3, bucket, prefix):
        await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


async def object_keys(s3: S3Client, bucket: str, prefix: str) -> list[str]:
    paginator = s3.get_paginator("list_objects_v2")
    return [
        entry["Key"]
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for entry in page.get("Contents", [])
    ]


async def unfinished_uploads(s3: S3Client, bucket: str, prefix: str) -> list[tuple[str, str]]:
    page = await s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [(upload["Key"], upload["UploadId"]) for upload in page.get("Uploads", [])]
