"""Start-up of one service as its own process: the body of every ``__main__``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from aiohttp import web

from shared.errors import ConfigError
from shared.logging import configure_logging
from shared.settings import Settings

EXIT_CONFIG_ERROR = 2


def load_settings_or_exit(service: str) -> Settings:
    """Settings from the environment, or one line naming the bad variable and exit 2."""
    try:
        return Settings.from_env(os.environ)
    except ConfigError as error:
        print(f"{service}: configuration error: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def run_service(
    service: str,
    create_app: Callable[[Settings], web.Application],
    port: Callable[[Settings], int],
    *,
    handler_cancellation: bool = False,
) -> None:
    """Run ``service`` until SIGINT/SIGTERM; in-flight requests get the shutdown grace."""
    settings = load_settings_or_exit(service)
    configure_logging(service, settings.log_level)
    try:
        app = create_app(settings)
    except ConfigError as error:
        print(f"{service}: configuration error: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    web.run_app(
        app,
        host=settings.host,
        port=port(settings),
        shutdown_timeout=settings.shutdown_timeout,
        handler_cancellation=handler_cancellation,
        access_log=None,  # observe_middleware logs every request as JSON
        print=None,
    )
