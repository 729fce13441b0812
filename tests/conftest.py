"""Fixtures shared by every test layer.

Isolation: each test session gets a run id; the MariaDB database, the Redis key prefix
and the RabbitMQ exchange/queue names all carry it, and are removed at the end, so two
runs (or a run and a developer's stack) never see each other's data.

Real services: ``VOD_TEST_MYSQL``, ``VOD_TEST_REDIS``, ``VOD_TEST_AMQP`` say where they are
(defaults: this machine's). When one is not reachable its tests are skipped, unless
``VOD_REQUIRE_SERVICES=1`` (as in CI), which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.settings import Settings

if TYPE_CHECKING:
    from tests.s3_server import S3Server

MYSQL_URL = os.environ.get("VOD_TEST_MYSQL", "mysql+aiomysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("VOD_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("VOD_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
REQUIRE_SERVICES = os.environ.get("VOD_REQUIRE_SERVICES") == "1"

RUN_ID = secrets.token_hex(4)
# One Ed25519 pair for the whole run: signing keys are slow to make and tests only need
# the gateway and the api to agree.
_JWT_KEY = Ed25519PrivateKey.generate()
JWT_PRIVATE_KEY = _JWT_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
JWT_PUBLIC_KEY = (
    _JWT_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
INTERNAL_TOKEN = "test-internal-token-" + secrets.token_hex(8)


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require(url: str, default_port: int, what: str) -> None:
    """Skip (or, with VOD_REQUIRE_SERVICES=1, fail) when ``what`` is not reachable."""
    if _reachable(url, default_port):
        return
    message = f"{what} not reachable at {urlsplit(url).netloc}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (VOD_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def run_id() -> str:
    return RUN_ID


@pytest.fixture(scope="session")
def namespace() -> str:
    """Prefix of Redis keys and RabbitMQ names for this test run."""
    return f"vodtest_{RUN_ID}"


@pytest.fixture(scope="session")
def mysql_server_url() -> str:
    require(MYSQL_URL, 3306, "MariaDB")
    return MYSQL_URL


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    require(REDIS_URL, 6379, "Redis")
    return REDIS_URL


@pytest.fixture(scope="session")
def amqp_server_url() -> str:
    require(AMQP_URL, 5672, "RabbitMQ")
    return AMQP_URL


@pytest.fixture(scope="session")
def mysql_database_url(mysql_server_url: str) -> Iterator[str]:
    """A MariaDB database of this run's own, dropped at the end of the session."""
    with mysql_database(mysql_server_url, f"vod_test_{RUN_ID}") as url:
        yield url


@contextmanager
def mysql_database(server_url: str, name: str) -> Iterator[str]:
    """A new, empty database ``name`` on the server of ``server_url`` (its URL), dropped
    at the end. For tests that need a database beside the run's own."""
    import pymysql

    parts = urlsplit(server_url)
    connection_args: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": parts.username or "root",
        "password": parts.password or "",
    }
    conn = pymysql.connect(**connection_args)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        yield parts._replace(path=f"/{name}").geturl()
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings as the standalone launcher would build them, overridable per test."""

    def build(**overrides: str) -> Settings:
        env = {
            "VOD_DB_URL": f"sqlite+aiosqlite:///{tmp_path}/vod.db",
            "VOD_REDIS_URL": f"memory://{RUN_ID}-{secrets.token_hex(4)}",
            "VOD_AMQP_URL": f"memory://{RUN_ID}-{secrets.token_hex(4)}",
            "VOD_BLOB_URL": f"file://{tmp_path}/blobs",
            "VOD_API_URL": "http://127.0.0.1:8001",
            "VOD_STREAM_URL": "http://127.0.0.1:8002",
            "VOD_SCHEDULER_URL": "http://127.0.0.1:8003",
            "VOD_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "VOD_NAMESPACE": f"vodtest_{RUN_ID}",
            "VOD_DB_MIGRATE": "1",
            "VOD_VAR_DIR": str(tmp_path / "var"),
            "VOD_JWT_PRIVATE_KEY": JWT_PRIVATE_KEY,
            "VOD_JWT_PUBLIC_KEY": JWT_PUBLIC_KEY,
            # Cheap hashes: tests check behaviour, not Argon2's cost.
            "VOD_ARGON2_TIME_COST": "1",
            "VOD_ARGON2_MEMORY_KIB": "1024",
        }
        env.update(overrides)
        return Settings.from_env(env)

    return build


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The run's S3 server (moto in a child process, or ``VOD_TEST_S3``) and its bucket.

    Imported here, not at the top: only the tests that use S3 pay for aiobotocore.
    """
    from tests.s3_server import serve_s3

    with serve_s3(RUN_ID, tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def internal_headers() -> dict[str, str]:
    return {"X-Internal-Token": INTERNAL_TOKEN}


@pytest.fixture
def real_backends_env(
    mysql_database_url: str, redis_server_url: str, amqp_server_url: str, namespace: str
) -> dict[str, str]:
    """Settings overrides that put a test on this machine's MariaDB, Redis and RabbitMQ."""
    return {
        "VOD_DB_URL": mysql_database_url,
        "VOD_REDIS_URL": redis_server_url,
        "VOD_AMQP_URL": amqp_server_url,
        # Per test: queues and keys of one test never meet another's.
        "VOD_NAMESPACE": f"{namespace}_{secrets.token_hex(3)}",
    }


@pytest.fixture
async def stack(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> Any:
    """The four apps behind a gateway, on embedded back ends."""
    from tests.stack import start_stack

    return await start_stack(make_settings(), aiohttp_server, aiohttp_client)


@pytest.fixture
async def real_stack(
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    real_backends_env: dict[str, str],
) -> Any:
    """The four apps behind a gateway, on the real MariaDB, Redis and RabbitMQ."""
    from shared.kv import open_kv
    from tests.stack import start_stack

    settings = make_settings(**real_backends_env)
    yield await start_stack(settings, aiohttp_server, aiohttp_client)
    kv = await open_kv(settings.redis_url, settings.namespace)
    try:
        await kv.delete_namespace()
    finally:
        await kv.close()


def _broker_names(kind: str) -> list[str]:
    """Names of this run's queues or exchanges, from rabbitmqctl (None of the API lists them)."""
    if shutil.which("rabbitmqctl") is None or urlsplit(AMQP_URL).hostname not in (
        "127.0.0.1",
        "localhost",
    ):
        return []
    listed = subprocess.run(
        ["rabbitmqctl", "-q", f"list_{kind}", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    prefix = f"vodtest_{RUN_ID}"
    return [line.strip() for line in listed.stdout.splitlines() if line.startswith(prefix)]


async def _sweep_run_leftovers() -> None:
    """Whatever this run left on the real servers: keys, queues, exchanges."""
    import aio_pika
    import redis.asyncio as redis

    if _reachable(REDIS_URL, 6379):
        client = redis.Redis.from_url(REDIS_URL)
        try:
            async for key in client.scan_iter(match=f"vodtest_{RUN_ID}*", count=1000):
                await client.unlink(key)
        finally:
            await client.aclose()
    queues, exchanges = _broker_names("queues"), _broker_names("exchanges")
    if queues or exchanges:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            for queue in queues:
                await channel.queue_delete(queue)
            for exchange in exchanges:
                await channel.exchange_delete(exchange)
        finally:
            await connection.close()


@pytest.fixture(scope="session", autouse=True)
def _remove_run_leftovers() -> Iterator[None]:
    """At the end of the run, remove every key, queue and exchange named for it.

    Fixtures delete what they make, but apps that are still stopping (a scheduler writing
    its job markers, a consumer declaring its queue) can add more after them; this is
    the backstop that keeps the shared servers clean between runs.
    """
    yield
    asyncio.run(_sweep_run_leftovers())
