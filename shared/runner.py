"""Start-up and shutdown of one service as its own process: the body of every ``__main__``.

Shutdown on SIGTERM or SIGINT, in order (docs/ARCHITECTURE.md, "Graceful shutdown"):

1. **Drain**: ``/readyz`` and ``/healthz`` answer 503 ``draining`` at once, while every
   other request is still served for ``VOD_SHUTDOWN_DRAIN_SECONDS``, so a balancer (or
   the gateway's replica check) stops sending new work before the door closes. A second
   signal ends the drain early.
2. **Close the door**: the listening socket closes (new connections are refused, which
   the gateway answers by trying the next replica) and idle keep-alive connections are
   closed.
3. **Finish in-flight requests**: up to ``VOD_SHUTDOWN_TIMEOUT`` seconds; a request
   still running then is cancelled and its connection closed (a download can resume
   elsewhere with ``Range``).
4. **Release resources**: cleanup contexts close consumers, pools and connections in
   reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from shared.errors import ConfigError
from shared.logging import configure_logging
from shared.settings import Settings
from shared.web import LIFECYCLE, server_options

logger = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    """Run ``service`` until SIGINT/SIGTERM, then drain and shut down gracefully."""
    settings = load_settings_or_exit(service)
    configure_logging(service, settings.log_level)
    try:
        app = create_app(settings)
    except ConfigError as error:
        print(f"{service}: configuration error: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    asyncio.run(serve(app, settings, port(settings), handler_cancellation=handler_cancellation))


async def serve(
    app: web.Application, settings: Settings, port: int, *, handler_cancellation: bool = False
) -> None:
    """Serve ``app`` on ``port`` until a stop signal, then shut down in the order above."""
    runner = web.AppRunner(
        app,
        access_log=None,  # observe_middleware logs every request as JSON
        shutdown_timeout=settings.shutdown_timeout,
        handler_cancellation=handler_cancellation,
        **server_options(app),
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, port).start()
        signals = _StopSignals()
        await signals.first.wait()
        app[LIFECYCLE].draining = True
        logger.info(
            "stop signal: draining for %.1f s, then up to %.1f s for requests in flight",
            settings.shutdown_drain_seconds,
            settings.shutdown_timeout,
        )
        if settings.shutdown_drain_seconds > 0:
            # A deliberate wait, not a poll: balancers need their probe period to see the
            # 503 and stop routing here. Another signal cuts it short.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signals.second.wait(), settings.shutdown_drain_seconds)
    finally:
        await runner.cleanup()
    logger.info("stopped")


class _StopSignals:
    """SIGINT/SIGTERM as events: the first starts the shutdown, a second hurries it.

    The handlers stay until the loop closes, so a third signal during cleanup cannot
    kill the process halfway through closing its resources.
    """

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.second = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._received)

    def _received(self) -> None:
        if self.first.is_set():
            self.second.set()
        self.first.set()
