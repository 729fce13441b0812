"""Private Redis, RabbitMQ and MariaDB servers that a test may stop and restart.

The shared servers on 6379, 5672 and 3306 belong to every engineer and run on this
machine: a fault test must never touch them. Each class here starts its own server as a
child of the test, on a free port, with all its state in a temporary directory, and
removes it afterwards.

Use them as context managers (``with RedisServer(tmp) as redis: ...``), or start several
at once with ``with running(redis, rabbitmq, mariadb): ...``; ``restart()``
stops the server and starts it again on the same port with the same data, and ``stop()``
/ ``start()`` leave a gap in between for a test to observe the outage. Every start waits
until the server answers (a real readiness check, never a fixed sleep) and every stop
until the process has gone. A private RabbitMQ node boots in ≈ 4 s here (a restart
≈ 7 s), so share one per test module.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

import pymysql
import redis

from tests.e2e.processes import free_port

START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
POLL_SECONDS = 0.05
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


def _wait_for(what: str, condition: Callable[[], bool], timeout: float, log: Path | None) -> None:
    """Poll ``condition()`` until true; fail with the server's log when it never is.

    Polling is the only way to learn that a process we do not control is ready.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(POLL_SECONDS)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what} not ready after {timeout:.0f} s\n{tail}")


class PrivateServer:
    """A server process of our own: start, stop, restart, and remove on exit."""

    name = "server"

    def __init__(self, base_dir: Path) -> None:
        self.dir = base_dir / f"{self.name}-{secrets.token_hex(3)}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.log_path = self.dir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """SIGTERM (a clean shutdown) and wait until the process has exited."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown work at all."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP for the block, then SIGCONT: connections stay open and the kernel still
        takes the bytes sent, but nothing answers, as in a network partition."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        self._process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._process.send_signal(signal.SIGCONT)

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir
            )

    def _wait_ready(self, probe: Callable[[], bool]) -> None:
        def ready() -> bool:
            if self._process is not None and self._process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{self.name} exited during start:\n{tail}")
            return probe()

        _wait_for(self.name, ready, START_TIMEOUT, self.log_path)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def running(*servers: PrivateServer) -> Iterator[None]:
    """Start ``servers`` side by side and stop (and remove) every one of them on exit.

    Each start mostly waits for its own server to boot, so they overlap well: a fixture
    needing all three back ends waits for the slowest instead of the sum. A start that
    fails still stops the servers that did start.
    """
    with ExitStack() as stack:
        for server in servers:
            stack.callback(server.__exit__, None, None, None)
        with ThreadPoolExecutor(len(servers)) as pool:
            starts = [pool.submit(server.start) for server in servers]
        for start in starts:
            start.result()
        yield


class RedisServer(PrivateServer):
    """``redis-server`` on a free port; nothing persisted unless ``appendonly=True``.

    Without persistence a restart loses every key, as a cache node that is replaced
    would; with the append-only file (fsync always) the keys survive a restart.
    """

    name = "redis"

    def __init__(self, base_dir: Path, *, appendonly: bool = False) -> None:
        super().__init__(base_dir)
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]
        self._spawn(argv)
        self._wait_ready(self._pings)

    def _pings(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
            return False
        finally:
            client.close()


class MariaDBServer(PrivateServer):
    """``mariadbd`` with its own data directory, on a free port; root with no password.

    ``--no-defaults`` keeps the machine's ``/etc/mysql`` configuration (port 3306, the
    shared socket) out of it entirely. The data directory survives restarts.
    """

    name = "mariadb"

    def __init__(self, base_dir: Path, *, database: str = "vod") -> None:
        super().__init__(base_dir)
        self.database = database
        self.data_dir = self.dir / "data"
        self.socket_path = self.dir / "mariadb.sock"
        self._installed = False

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the test database (created at the first start)."""
        return f"mysql+aiomysql://root@127.0.0.1:{self.port}/{self.database}"

    def _install(self) -> None:
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.data_dir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self._installed = True

    def start(self) -> None:
        if not self._installed:
            self._install()
        argv = [
            "mariadbd",
            "--no-defaults",
            f"--datadir={self.data_dir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket_path}",
            f"--pid-file={self.dir / 'mariadb.pid'}",
            "--user=root",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=16M",
            # Durability is what a restart test checks: keep the defaults that give it.
            "--innodb-flush-log-at-trx-commit=1",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_bin",
            "--max-connections=500",
        ]
        self._spawn(argv)
        self._wait_ready(self._answers)
        with self.connect(database=None) as connection, connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")

    def connect(self, database: str | None = "") -> pymysql.Connection[pymysql.cursors.Cursor]:
        """A blocking connection for test assertions (the default: the test database)."""
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user="root",
            password="",
            database=self.database if database == "" else database,
            connect_timeout=2,
            autocommit=True,
        )

    def _answers(self) -> bool:
        if not _accepts_connections(self.port):
            return False
        try:
            with self.connect(database=None) as connection, connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                return True
        except pymysql.err.OperationalError:
            return False


class RabbitMQServer(PrivateServer):
    """A RabbitMQ node of our own (``vod-<id>@localhost``), all state in its directory.

    It runs as the current user with ``HOME`` in its directory, so its Erlang cookie is
    its own, and with its own config and env files, so the machine's node (whose files
    name port 5672 and ``rabbit@localhost``) is never addressed. ``rabbitmqctl -n`` with
    the same environment manages it.

    ``restart()`` stops and boots the whole node (≈ 7 s); ``restart_app()`` stops and
    starts only the broker application inside the running VM (≈ 2.5 s). For a client both
    look the same: every connection is closed, the port refuses, then accepts again with
    durable queues and persistent messages intact.
    """

    name = "rabbitmq"

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self.node = f"vod-{secrets.token_hex(4)}@localhost"
        self.dist_port = free_port()
        config = self.dir / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        self._env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin") + f":{RABBITMQ_BIN}",
            "HOME": str(self.dir),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _ctl(self, *args: str, timeout: float = START_TIMEOUT) -> None:
        result = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env,
            capture_output=True,
            text=True,
            timeout=timeout + 10,
            check=False,
        )
        if result.returncode != 0:
            log = "".join(
                p.read_text(errors="replace")[-3000:] for p in (self.dir / "log").glob("*.log")
            )
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} failed:\n{result.stdout}{result.stderr}\n{log}"
            )

    def start(self) -> None:
        # Not -detached: as our child it dies with the test run's process tree if all
        # else fails, and its pid is ours to stop.
        self._spawn([str(RABBITMQ_BIN / "rabbitmq-server")], env=self._env)
        # The port first: ``await_startup`` asked before the new VM has registered its
        # node name with epmd gives up at once ("node not running at all") instead of
        # waiting. The AMQP listener opens late in the boot, long after that
        # registration; await_startup then confirms the boot finished.
        self._wait_ready(lambda: _accepts_connections(self.port))
        self._ctl("await_startup", "--timeout", str(int(START_TIMEOUT)))

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            try:
                self._ctl("shutdown", timeout=STOP_TIMEOUT)
            except AssertionError:
                self._process.send_signal(signal.SIGTERM)
        super().stop()

    def stop_app(self) -> None:
        """Stop the broker inside the running VM: connections close, the port refuses."""
        self._ctl("stop_app")
        _wait_for(
            "rabbitmq listener closed",
            lambda: not _accepts_connections(self.port),
            STOP_TIMEOUT,
            None,
        )

    def start_app(self) -> None:
        # start_app returns once the broker application has booted (unlike a node's
        # boot, which needs await_startup): one CLI call, each of which starts an Erlang
        # VM of its own and costs seconds on a busy machine.
        self._ctl("start_app")
        self._wait_ready(lambda: _accepts_connections(self.port))

    def restart_app(self) -> None:
        self.stop_app()
        self.start_app()
