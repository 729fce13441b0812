"""The relational database port: one ``Database`` over MySQL (aiomysql) or SQLite (aiosqlite).

Repositories write inside ``transaction()`` and read inside ``connect()`` (the primary) or
``reader()`` (a read replica when ``VOD_DB_READ_URL`` names one), with SQLAlchemy Core
statements built on ``shared.db.schema``. Driver errors leave this module as
``DuplicateKeyError`` or ``DatabaseUnavailableError``; anything else (a bad statement) is
a bug and propagates as SQLAlchemy raised it.

Read/write split: ``reader()`` is for reads that may lag a little behind the last commit
(lists, search, other people's pages). It goes to the replica engine unless the current
context says the reads must see the caller's own writes (``reads_on_primary()``, set per
request by the api while a user writes and for a short window after). ``connect()`` always
reads the primary: reads that decide a write, and reads whose result is cached beyond the
replica's lag. Without a replica (SQLite standalone, or no ``VOD_DB_READ_URL``) both are the
primary.

Opening is lazy: ``open_database`` builds the pool but does not connect, so a service
whose database is down still starts and reports it on ``/readyz`` (via ``ping``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from sqlalchemy import event, exc, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from shared.db.errors import DatabaseUnavailableError, DuplicateKeyError

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"
MIGRATION_LOCK_TIMEOUT_S: Final = 60

# Server error numbers (MySQL/MariaDB) of a duplicate primary or unique key.
_MYSQL_DUPLICATE_KEY = frozenset({1022, 1062, 1586})
# Server errors that pymysql files under OperationalError although the statement, not the
# server, is at fault (1054: unknown column). Everything else there is an outage.
_MYSQL_STATEMENT_ERRORS = frozenset({1054})
_SQLITE_DUPLICATE_KEY = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})
# The execution option that makes a SQLite connection begin with BEGIN IMMEDIATE.
_SQLITE_BEGIN_OPTION = "vod_sqlite_begin"
# True inside ``reads_on_primary()``: ``Database.reader()`` then reads the primary. A
# ContextVar, so it follows one request's task (and the tasks it starts) and no other.
_PRIMARY_READS: ContextVar[bool] = ContextVar("vod_db_primary_reads", default=False)


@contextmanager
def reads_on_primary() -> Iterator[None]:
    """Within the block (and tasks started in it), ``reader()`` uses the primary: the
    reads see every write already committed, the caller's own included."""
    token = _PRIMARY_READS.set(True)
    try:
        yield
    finally:
        _PRIMARY_READS.reset(token)


class Database:
    """An async SQLAlchemy engine with vod's transaction, error and migration conventions."""

    def __init__(self, engine: AsyncEngine, *, replica: AsyncEngine | None = None) -> None:
        self._engine = engine
        self._replica = replica
        # Writers on SQLite take the write lock at BEGIN: a deferred transaction that reads
        # and then writes fails at once with "database is locked" when another writer got
        # in between, whereas BEGIN IMMEDIATE waits its turn (busy_timeout).
        self._writer = (
            engine.execution_options(**{_SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
            if engine.dialect.name == "sqlite"
            else engine
        )

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def dialect_name(self) -> str:
        """``"mysql"`` or ``"sqlite"``."""
        return self._engine.dialect.name

    @property
    def has_replica(self) -> bool:
        """Whether ``reader()`` may go to a read replica (``VOD_DB_READ_URL``)."""
        return self._replica is not None

    def reads_go_to_replica(self) -> bool:
        """Where ``reader()`` would connect now: the replica, unless there is none or the
        current context is inside ``reads_on_primary()``."""
        return self._replica is not None and not _PRIMARY_READS.get()

    async def ping(self) -> None:
        """Run ``SELECT 1``; raises ``DatabaseUnavailableError`` when that fails."""
        async with self.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def ping_replica(self) -> None:
        """``SELECT 1`` on the replica (the primary when there is none)."""
        with translate_errors():
            async with (self._replica or self._engine).connect() as conn:
                await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        """Close every pooled connection. The object is not used afterwards."""
        await self._engine.dispose()
        if self._replica is not None:
            await self._replica.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection inside BEGIN .. COMMIT; any exception rolls it back and propagates."""
        with translate_errors():
            async with self._writer.begin() as conn:
                yield conn

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection to the primary for reads; whatever it began is rolled back when the
        block ends. For reads that must see the latest commit."""
        with translate_errors():
            async with self._engine.connect() as conn:
                yield conn

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads that may lag behind the primary by the replica's delay:
        the replica when there is one and the context is not ``reads_on_primary()``."""
        engine = self._replica if self.reads_go_to_replica() else self._engine
        with translate_errors():
            async with (engine or self._engine).connect() as conn:
                yield conn

    async def migrate(self, revision: str = "head") -> None:
        """Upgrade the schema to ``revision``. Safe to run from several replicas at once."""
        await self._run_alembic(lambda config: command.upgrade(config, revision))

    async def downgrade(self, revision: str) -> None:
        """Downgrade the schema to ``revision`` (``"base"`` drops every table)."""
        await self._run_alembic(lambda config: command.downgrade(config, revision))

    async def _run_alembic(self, action: Callable[[Config], None]) -> None:
        with translate_errors():
            async with self._writer.connect() as conn:
                await conn.run_sync(_migrate_on, action)


async def open_database(
    url: str,
    *,
    read_url: str | None = None,
    pool_size: int = 10,
    connect_timeout: float = 5.0,
) -> Database:
    """A ``Database`` for a ``mysql+aiomysql://`` or ``sqlite+aiosqlite:///path`` URL.

    Does not connect yet. ``pool_size`` connections are kept per process (as many again
    may open in a burst); ``connect_timeout`` bounds one MySQL connection attempt. A
    relative SQLite path is relative to the working directory; its folder is created.
    ``read_url`` (MySQL only) is a read replica of the same schema for ``reader()``; it
    gets a pool of its own of the same size. Raises ``ValueError`` for any other URL.
    """
    engine = _create_engine(url, pool_size=pool_size, connect_timeout=connect_timeout)
    if read_url is None:
        return Database(engine)
    replica = _create_engine(read_url, pool_size=pool_size, connect_timeout=connect_timeout)
    if engine.dialect.name != "mysql" or replica.dialect.name != "mysql":
        await engine.dispose()
        await replica.dispose()
        raise ValueError("a read replica needs MySQL for both URLs (mysql+aiomysql://)")
    return Database(engine, replica=replica)


def _create_engine(url: str, *, pool_size: int, connect_timeout: float) -> AsyncEngine:
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise ValueError("not a database URL") from None
    if parsed.drivername == "mysql+aiomysql":
        if "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        engine = create_async_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=10,
            pool_pre_ping=True,
            # Below the usual idle cut-offs of servers and proxies in between.
            pool_recycle=1800,
            # Fewer gap locks and deadlocks than REPEATABLE READ under concurrent inserts.
            isolation_level="READ COMMITTED",
            # Keep bound values (password hashes, tokens) out of error messages and logs.
            hide_parameters=True,
            connect_args={
                "connect_timeout": connect_timeout,
                # NOW() and friends in UTC, like every DATETIME we store.
                "init_command": "SET time_zone = '+00:00'",
            },
        )
    elif parsed.drivername == "sqlite+aiosqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise ValueError("a SQLite database URL must name a file: sqlite+aiosqlite:///path")
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=10,
            hide_parameters=True,
        )
        _install_sqlite_hooks(engine)
    else:
        raise ValueError(
            f"unsupported database URL scheme {parsed.drivername!r}: "
            "use mysql+aiomysql:// or sqlite+aiosqlite:///"
        )
    return engine


async def create_database(url: str) -> None:
    """Create the MySQL database ``url`` names when it is missing (SQLite needs nothing)."""
    parsed = make_url(url)
    if parsed.drivername != "mysql+aiomysql":
        return
    name = parsed.database or ""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"database name {name!r}: use letters, digits and _")
    server = Database(create_async_engine(parsed.set(database=""), poolclass=NullPool))
    try:
        async with server.connect() as conn:
            await conn.execute(
                text(
                    f"CREATE DATABASE IF NOT EXISTS `{name}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
            )
    finally:
        await server.close()


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn driver errors raised in the block into ``DuplicateKeyError`` or
    ``DatabaseUnavailableError``; every other exception passes unchanged.

    ``Database.transaction()`` and ``connect()`` already apply it on their way out; wrap a
    single statement in it to catch a duplicate key and carry on in the same transaction.
    """
    try:
        yield
    except exc.IntegrityError as error:
        if _is_duplicate_key(error.orig):
            raise DuplicateKeyError(str(error.orig)) from error
        raise
    except exc.DBAPIError as error:
        if _is_unavailable(error):
            raise DatabaseUnavailableError(
                f"database unavailable: {type(error.orig).__name__}: {error.orig}"
            ) from error
        raise
    except (exc.DisconnectionError, exc.TimeoutError) as error:
        raise DatabaseUnavailableError(f"database unavailable: {error}") from error


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code (there is no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _migrate_on(conn: Connection, action: Callable[[Config], None]) -> None:
    config = alembic_config(conn)
    if conn.dialect.name == "sqlite":
        # Batch migrations drop and recreate tables; with foreign keys enforced that would
        # cascade into the rows that refer to them. SQLite's documented procedure: switch
        # enforcement off outside the transaction, check before committing.
        _sqlite_pragma(conn, "PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                action(config)
                violations = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if violations:
                    raise RuntimeError(f"migration broke foreign keys: {violations[:5]}")
        finally:
            _sqlite_pragma(conn, "PRAGMA foreign_keys=ON")
        return
    # MySQL commits every DDL statement on its own, so replicas starting together would
    # interleave their migrations; a named server lock makes them take turns. It belongs
    # to the session, so it outlives the commits and dies with a lost connection.
    acquired = conn.execute(
        text("SELECT GET_LOCK(CONCAT(DATABASE(), '.migrate'), :timeout)"),
        {"timeout": MIGRATION_LOCK_TIMEOUT_S},
    ).scalar()
    conn.commit()
    if acquired != 1:
        raise DatabaseUnavailableError(
            f"the migration lock stayed taken for {MIGRATION_LOCK_TIMEOUT_S} s"
        )
    try:
        with conn.begin():
            action(config)
    finally:
        conn.execute(text("SELECT RELEASE_LOCK(CONCAT(DATABASE(), '.migrate'))"))
        conn.commit()


def _sqlite_pragma(conn: Connection, pragma: str) -> None:
    # Through the driver's cursor: SQLAlchemy would BEGIN first, and these pragmas do
    # nothing inside a transaction.
    cursor = conn.connection.cursor()
    try:
        cursor.execute(pragma)
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """WAL lets readers run beside the writer; the mode is persistent, set once per file.

    Switching needs the file to itself and SQLite does not wait for that (no busy
    handler): when another connection holds it, this one carries on in the current mode
    and a later connection makes the switch. Nothing depends on WAL for correctness.
    """
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as error:
        if "locked" not in str(error):
            raise


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # sqlite3's own transaction handling skips BEGIN before SELECT and DDL, which
        # breaks isolation and transactional migrations; the begin hook below does it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode")
            if cursor.fetchone()[0] != "wal":
                _switch_to_wal(cursor)
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get(_SQLITE_BEGIN_OPTION, "BEGIN"))


def _is_duplicate_key(orig: BaseException | None) -> bool:
    if isinstance(orig, sqlite3.IntegrityError):
        return getattr(orig, "sqlite_errorname", "") in _SQLITE_DUPLICATE_KEY
    return _mysql_error_number(orig) in _MYSQL_DUPLICATE_KEY


def _is_unavailable(error: exc.DBAPIError) -> bool:
    if error.connection_invalidated or isinstance(error, exc.InterfaceError):
        return True
    if not isinstance(error, exc.OperationalError):
        return False
    if isinstance(error.orig, sqlite3.Error):
        # SQLITE_ERROR is a statement SQLite could not run (no such table, syntax); the
        # other codes (busy, locked, cannot open, I/O, full) are the database failing us.
        return getattr(error.orig, "sqlite_errorname", "") != "SQLITE_ERROR"
    return _mysql_error_number(error.orig) not in _MYSQL_STATEMENT_ERRORS


def _mysql_error_number(orig: BaseException | None) -> int | None:
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None
