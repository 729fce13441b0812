"""Operator commands for the schema, configured by ``VOD_DB_URL`` alone.

python -m shared.db migrate              # upgrade to the newest revision
python -m shared.db migrate 0001         # or to a given one
python -m shared.db downgrade base       # undo every migration (drops the tables)
python -m shared.db create-database      # MySQL: create the database VOD_DB_URL names, if missing
python -m shared.db make-admin USERNAME  # let a user into /api/v1/admin/ (--revoke: take it back)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from alembic.util import CommandError
from sqlalchemy import update

from shared.db.database import create_database, open_database
from shared.db.errors import DatabaseUnavailableError
from shared.db.schema import users
from shared.errors import ConfigError
from shared.logging import configure_logging

logger = logging.getLogger("shared.db")


async def _make_admin(url: str, username: str, *, revoke: bool) -> None:
    db = await open_database(url)
    try:
        async with db.transaction() as conn:
            result = await conn.execute(
                update(users)
                .where(users.c.username_key == username.lower())
                .values(is_admin=not revoke)
            )
    finally:
        await db.close()
    if result.rowcount != 1:
        raise ConfigError("USERNAME", f"no user {username!r}")
    print(  # noqa: T201 - the operator's confirmation, not a log line
        f"{username} is no longer an administrator"
        if revoke
        else f"{username} is now an administrator (GET /api/v1/admin/queues to check)"
    )


async def _run(url: str, command: str, revision: str, *, revoke: bool = False) -> None:
    if command == "create-database":
        await create_database(url)
        return
    if command == "make-admin":
        await _make_admin(url, revision, revoke=revoke)
        return
    try:
        db = await open_database(url)
    except ValueError as exc:
        raise ConfigError("VOD_DB_URL", str(exc)) from None
    try:
        if command == "migrate":
            await db.migrate(revision)
        else:
            await db.downgrade(revision)
    finally:
        await db.close()


def _database_url() -> str:
    url = os.environ.get("VOD_DB_URL", "")
    if not url:
        raise ConfigError("VOD_DB_URL", "is required but not set")
    return url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.db", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="upgrade the schema (default: to head)")
    migrate.add_argument("revision", nargs="?", default="head")
    downgrade = commands.add_parser("downgrade", help="downgrade the schema to a revision")
    downgrade.add_argument("revision")
    commands.add_parser("create-database", help="create the MySQL database if it is missing")
    make_admin = commands.add_parser("make-admin", help="make a user an administrator")
    make_admin.add_argument("revision", metavar="USERNAME")
    make_admin.add_argument("--revoke", action="store_true", help="take admin rights away")
    args = parser.parse_args(argv)
    args.revision = getattr(args, "revision", "")

    configure_logging(
        "db",
        os.environ.get("VOD_LOG_LEVEL", "INFO").upper(),
        os.environ.get("VOD_LOG_FORMAT", "auto").lower(),
    )
    try:
        asyncio.run(
            _run(
                _database_url(),
                args.command,
                args.revision,
                revoke=getattr(args, "revoke", False),
            )
        )
    except (ConfigError, CommandError) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - one line naming the problem is the point
        return 2
    except DatabaseUnavailableError as exc:
        logger.error("%s", exc)  # noqa: TRY400 - the cause is in the message, not a bug
        return 1
    if args.command in ("migrate", "downgrade"):
        logger.info("schema %s to %s done", args.command, args.revision)
    elif args.command == "create-database":
        logger.info("database ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
