"""At ``VOD_LOG_LEVEL=DEBUG`` the logs carry no password hash and no refresh token, nor
its hash (issue 19, point 14): what a log reader (or a log pipeline) sees is not a key."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from api_service.services.sessions import hash_refresh_token
from shared.logging import configure_logging
from tests.stack import PASSWORD, Stack

# Loggers configure_logging sets a level on; restored after the test like the root.
_TOUCHED = ("aiohttp.access", "sqlalchemy", "sqlalchemy.engine", "aiosqlite", "aiomysql")


@pytest.fixture
def debug_logs() -> Iterator[io.StringIO]:
    """The services' own logging at DEBUG, as ``__main__`` configures it, into a buffer."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in _TOUCHED})
    configure_logging("test", "DEBUG")
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    logged = io.StringIO()
    handler.setStream(logged)
    try:
        yield logged
    finally:
        handlers, level, levels = saved
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)


async def test_debug_logs_hold_no_password_or_refresh_token_hash(
    stack: Stack, debug_logs: io.StringIO
) -> None:
    """On SQLite (aiosqlite)."""
    await sign_in_and_refresh(stack, debug_logs)


async def test_debug_logs_hold_no_password_or_refresh_token_hash_on_mariadb(
    real_stack: Stack, debug_logs: io.StringIO
) -> None:
    """On MariaDB (aiomysql)."""
    await sign_in_and_refresh(real_stack, debug_logs)


async def sign_in_and_refresh(stack: Stack, debug_logs: io.StringIO) -> None:
    """Signs a user up and in, refreshes, fails a sign-in; checks the logs of it all."""
    user = await stack.sign_up()
    tokens = await stack.sign_in(user["username"])
    refreshed = await stack.gateway.post(
        "/api/v1/sessions/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert refreshed.status == 200, await refreshed.text()
    rotated = (await refreshed.json())["refresh_token"]
    # A wrong password reads the stored hash too (to verify against it).
    wrong = await stack.gateway.post(
        "/api/v1/sessions", json={"username": user["username"], "password": "not " + PASSWORD}
    )
    assert wrong.status == 401
    logging.getLogger(__name__).debug("probe")
    logged = debug_logs.getvalue()
    assert '"level":"DEBUG"' in logged  # DEBUG was on: the checks below are not vacuous
    assert "$argon2" not in logged
    assert PASSWORD not in logged
    for token in (tokens["refresh_token"], rotated):
        assert token not in logged
        assert hash_refresh_token(token) not in logged
