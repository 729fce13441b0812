"""Start-up and shutdown of one service as its own process: the body of every ``__main__``.

Shutdown on SIGTERM or SIGINT, in order (docs/ARCHITECTURE.md, "Graceful shutdown"):

1. **Drain**: ``/readyz`` and ``/healthz`` answer 503 ``draining`` at once, while every
   other request is still served for ``VOD_SHUTDOWN_DRAIN_SECONDS``, so a balancer (or
   the gateway's replica check) stops sending new work before the door closes. A second
   signal ends the drain early.
   Every response from then on closes its connection (``Connection: close``), so
   keep-alive clients reconnect.
2. **Close the door**: the listening socket closes (new connections are refused, which
   the gateway answers by trying the next replica), idle keep-alive connections are
   closed, and each app's ``on_shutdown`` closes its WebSockets with 1001, so their
   clients reconnect elsewhere.
3. **Finish in-flight requests**: up to ``VOD_SHUTDOWN_TIMEOUT`` seconds, while their
   connections are still read: an upload whose body is still arriving completes. Only
   then does aiohttp's own shutdown run (it stops reading request bodies at once, which
   is why it comes last): a request still running after ``FINAL_GRACE_SECONDS`` more is
   cancelled and its connection closed (a download can resume elsewhere with ``Range``).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import uvloop
from aiohttp import web

from shared.errors import ConfigError
from shared.logging import configure_logging
from shared.settings import Settings
from shared.web import LIFECYCLE, OPERATOR_APP, Lifecycle, server_options

logger = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What aiohttp's own shutdown gives handlers once VOD_SHUTDOWN_TIMEOUT is over: enough for
# WebSockets closed by on_shutdown to end and a returned response to be written out; a
# request that overran the timeout is cancelled after it (aiohttp may wait twice this).
FINAL_GRACE_SECONDS = 1.0
EventLoop = Literal["uvloop", "asyncio"]


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
    event_loop: EventLoop = "uvloop",
) -> None:
    """Run ``service`` until SIGINT/SIGTERM, then drain and shut down gracefully.

    ``event_loop``: uvloop where the process relays requests and small answers (its
    transports and parser glue are C: less CPU per request), asyncio's own where it
    serves files, since only asyncio's loop has ``sendfile`` (on uvloop every byte of a
    stream would be read into Python and written out again). ``VOD_UVLOOP=0`` runs the
    standard loop everywhere.
    """
    settings = load_settings_or_exit(service)
    configure_logging(service, settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except ConfigError as error:
        print(f"{service}: configuration error: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop == "uvloop" and settings.uvloop:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(app, settings, port(settings), handler_cancellation=handler_cancellation))


@dataclass(frozen=True, slots=True)
class Served:
    """One app of a process and where it listens. ``handler_cancellation``: a client that
    hangs up cancels its handler (the gateway, which faces clients, wants that). ``host``:
    None for ``settings.host``."""

    name: str
    app: web.Application
    port: int
    handler_cancellation: bool = False
    host: str | None = None


async def serve(
    app: web.Application, settings: Settings, port: int, *, handler_cancellation: bool = False
) -> None:
    """Serve ``app`` on ``port`` until a stop signal, then shut down in the order above."""
    await serve_all([Served("app", app, port, handler_cancellation)], settings)


async def serve_all(
    served: Sequence[Served], settings: Settings, *, on_ready: Callable[[], None] | None = None
) -> None:
    """Serve every app of ``served`` (started in order; each step of the shutdown is taken
    by all of them together, the last started first) until a stop signal.

    ``on_ready`` runs once every app listens. Several apps in one process are what
    ``python -m standalone`` runs: they share one shutdown, as one process does. A public
    app's operators' app (``OPERATOR_APP``) is served right after it, on the operators'
    listener.
    """
    runners: list[tuple[_Runner, Lifecycle]] = []
    sites: list[web.TCPSite] = []
    try:
        for item in with_operator_apps(served, settings):
            runner = _Runner(
                item.app,
                access_log=None,  # service_middleware logs every request as JSON
                shutdown_timeout=FINAL_GRACE_SECONDS,
                handler_cancellation=item.handler_cancellation,
                **server_options(item.app),
            )
            await runner.setup()
            runners.insert(0, (runner, item.app[LIFECYCLE]))
            host = item.host or settings.host
            site = web.TCPSite(runner, host, item.port)
            await site.start()
            sites.insert(0, site)
            logger.info("%s listening on %s:%d", item.name, host, item.port)
        if on_ready is not None:
            on_ready()
        signals = _StopSignals()
        await signals.first.wait()
        for _, lifecycle in runners:
            lifecycle.draining = True
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
        for site in sites:
            await site.stop()
        # One turn of the loop: bytes a client sent before the door closed are read, so its
        # request shows on its connection before idle ones are closed (aiohttp's own
        # cleanup yields here for the same reason).
        await asyncio.sleep(0)
        working: list[asyncio.Task[None]] = []
        for runner, _ in runners:
            working += _close_idle_connections(runner)
        for runner, _ in runners:
            await runner.shutdown()
        # Not runner.cleanup() yet: it stops reading every connection at once
        # (aio-libs/aiohttp#2298), and a request whose body is still arriving would hang
        # until cancelled. Here their connections are still read. The connections' own
        # tasks are waited for as well as the counted requests: a request aiohttp has
        # taken off its connection whose handler has not run yet is not counted.
        try:
            async with asyncio.timeout(settings.shutdown_timeout):
                for _, lifecycle in runners:
                    await lifecycle.wait_idle()
                if working:
                    await asyncio.wait(working)
        except TimeoutError:
            logger.warning(
                "%d request(s) still in flight after %.1f s: cancelling them",
                sum(lifecycle.requests for _, lifecycle in runners),
                settings.shutdown_timeout,
            )
    finally:
        for runner, _ in runners:
            await runner.cleanup()
    logger.info("stopped")


def with_operator_apps(served: Sequence[Served], settings: Settings) -> list[Served]:
    """``served``, each public app followed by its operators' app on
    ``settings.metrics_host``:``settings.metrics_port`` (after it: its readiness checks
    use what the public app's cleanup contexts make, and it closes first)."""
    result: list[Served] = []
    for item in served:
        result.append(item)
        if OPERATOR_APP in item.app:
            result.append(
                Served(
                    f"{item.name} operators",
                    item.app[OPERATOR_APP],
                    settings.metrics_port,
                    host=settings.metrics_host,
                )
            )
    return result


def _close_idle_connections(runner: web.AppRunner) -> list[asyncio.Task[None]]:
    """Closes the keep-alive connections waiting for their next request (nothing may
    arrive on them now), and returns the tasks of the others, which have a request to
    finish (they close after its response: every response closes while draining).

    Idle means aiohttp's connection task waits for a request head: its ``_waiter`` is
    pending and no parsed request is queued (pinned aiohttp 3.14). Anything else is a
    request on its way: queued, taken off the queue with its handler not yet run (not
    counted by the middleware yet), being handled, or its response being written.
    ``close()`` on such a connection stops reading it, and its body would never arrive:
    seen in CI under load, a chunk PUT whose connection was closed at SIGTERM waited out
    the 30 s body timeout, and the gateway was killed. An idle one is closed at once,
    transport too: ``close()`` alone would leave the socket open and drop the client's
    next request unanswered until the process exits.
    """
    working: list[asyncio.Task[None]] = []
    if runner.server is None:
        return working
    for connection in list(runner.server.connections):
        waiter = getattr(connection, "_waiter", None)
        queued = getattr(connection, "_messages", None)
        if waiter is not None and not waiter.done() and not queued:
            connection.force_close()
            continue
        task = getattr(connection, "_task_handler", None)
        if task is not None and not task.done():
            working.append(task)
    return working


class _Runner(web.AppRunner):
    """An ``AppRunner`` whose ``on_shutdown`` runs once: when ``serve`` closes the door,
    not again in ``cleanup``."""

    _shut_down = False

    async def shutdown(self) -> None:
        if not self._shut_down:
            self._shut_down = True
            await super().shutdown()


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
