"""`python -m standalone`: gateway, api, stream and scheduler in one process.

Embedded back ends (SQLite under ./var, in-process Redis and message bus, blobs under
./var/blobs) unless VOD_* variables name real ones. Ctrl-C or SIGTERM stops it cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable

from aiohttp import web

from api_service.app import create_app as create_api_app
from gateway.app import create_app as create_gateway_app
from scheduler_service.app import create_app as create_scheduler_app
from shared.auth import TokenSigner, ensure_dev_keypair
from shared.errors import ConfigError
from shared.logging import configure_logging
from shared.runner import EXIT_CONFIG_ERROR, Served, serve_all
from shared.settings import STANDALONE_DEFAULTS, Settings
from shared.web import REQUEST_LOG_LEVEL
from stream_service.app import create_app as create_stream_app

AppFactory = Callable[[Settings], web.Application]


def _apps(settings: Settings) -> list[tuple[str, AppFactory, int]]:
    # Upstreams first, the gateway last: it opens its door when there is something behind it.
    return [
        ("api", create_api_app, settings.api_port),
        ("stream", create_stream_app, settings.stream_port),
        ("scheduler", create_scheduler_app, settings.scheduler_port),
        ("gateway", create_gateway_app, settings.gateway_port),
    ]


def _served(settings: Settings) -> list[Served]:
    served = []
    for name, factory, port in _apps(settings):
        app = factory(settings)
        if name != "gateway":
            # A person watching `make run` sees one line per request, the gateway's: an
            # upstream's line for the same request (same request id) is at DEBUG.
            app[REQUEST_LOG_LEVEL] = logging.DEBUG
        # Only the gateway faces clients: a hang-up there cancels the upstream call.
        served.append(Served(name, app, port, handler_cancellation=name == "gateway"))
    return served


def _print_url(settings: Settings) -> None:
    print(  # noqa: T201 - the one line a person running `make run` is waiting for
        f"vod is running: http://{settings.host}:{settings.gateway_port}/  (Ctrl-C to stop)\n"
        f"operators: http://{settings.metrics_host}:{settings.metrics_port}/metrics and /readyz",
        flush=True,
    )


def main() -> None:
    try:
        settings = Settings.from_env(os.environ, defaults=STANDALONE_DEFAULTS)
    except ConfigError as error:
        print(f"standalone: configuration error: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    configure_logging("standalone", settings.log_level, settings.log_format)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    if settings.jwt_private_key is None:
        # A dev pair made on first run and kept under ./var, so sign-ins survive restarts.
        private_pem, public_pem = ensure_dev_keypair(settings.var_dir)
        settings = dataclasses.replace(
            settings, jwt_private_key=private_pem, jwt_public_key=public_pem
        )
    elif settings.jwt_public_key is None:
        settings = dataclasses.replace(
            settings, jwt_public_key=TokenSigner(settings.jwt_private_key).public_key_pem()
        )

    served = _served(settings)
    # The same shutdown as each service's own process (shared.runner): requests in flight,
    # uploads whose bodies are still arriving included, finish before the apps close.
    asyncio.run(serve_all(served, settings, on_ready=lambda: _print_url(settings)))


if __name__ == "__main__":
    main()
