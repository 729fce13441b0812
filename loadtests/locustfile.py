"""Load test of vod through the gateway: `locust -f loadtests/locustfile.py --host URL`
(or `make loadtest`, which also checks the thresholds: loadtests/README.md).

Three kinds of people, in this mix (locust's ``weight``: of every 11 users started, 8 are
viewers, 2 commenters, 1 uploader), each through the project's own client code
(``vod_client.sync.SyncVodClient`` over locust's HTTP session, so every request lands in
locust's statistics under its route):

- ``Viewer`` (8), every 1-3 s: browses the list, opens a video's page, which joins the
  live WebSocket (anonymous, as most viewers are) for ``LOADTEST_LIVE_SECONDS`` (10) while
  the player reads ``LOADTEST_RANGES_PER_WATCH`` (4) 1 MiB ranges, reads its comments and
  its danmaku;
- ``Commenter`` (2), every 4-8 s: signs up on its first visit, then browses and posts a
  comment and a danmaku on a video it found;
- ``Uploader`` (1), every 5-15 s: signs up on its first visit, then uploads a generated
  ``LOADTEST_UPLOAD_MIB`` (10) MiB file in 8 MiB chunks (incompressible, different every
  time: no instant upload), publishes it and opens its page.

Rate limits are part of the design: a 429 counts as a success in the statistics (the
server did what it promised) and is tallied per route, printed when the run ends.

Seed data: before the users start, ``test_start`` checks that the target is vod (its
OpenAPI document) and publishes videos until the list has ``LOADTEST_SEED_VIDEOS`` of them.

Never imported by pytest: importing locust patches the standard library with gevent. The
WebSocket client is websocket-client (blocking sockets, so gevent makes it cooperative).
"""

from __future__ import annotations

import os
import random
import re
import secrets
import threading
import time
from collections import Counter
from contextlib import suppress
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import urlsplit

import requests
import websocket
from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.exception import RescheduleTask

from vod_client.client import ApiError
from vod_client.source import BytesSource
from vod_client.sync import HttpResponse, SyncVodClient

MIB: Final = 1024 * 1024
RANGE_BYTES: Final = MIB
# A player reads ahead a few ranges, then the viewer leaves or seeks.
RANGES_PER_WATCH: Final = int(os.environ.get("LOADTEST_RANGES_PER_WATCH", "4"))
LIVE_SECONDS: Final = float(os.environ.get("LOADTEST_LIVE_SECONDS", "10"))
UPLOAD_BYTES: Final = int(float(os.environ.get("LOADTEST_UPLOAD_MIB", "10")) * MIB)
SEED_VIDEOS: Final = int(os.environ.get("LOADTEST_SEED_VIDEOS", "3"))
SEED_VIDEO_BYTES: Final = 4 * MIB
PASSWORD: Final = "loadtest-" + secrets.token_hex(8)
KNOWN_VIDEOS_KEPT: Final = 200
HEALTHZ: Final = "/healthz"
OPENAPI: Final = "/api/v1/openapi.json"
LIVE_ROUTE: Final = "/api/v1/videos/{id}/live"
TASK_EXCEPTION_EXIT_CODE: Final = 3
SEED_FAILED_EXIT_CODE: Final = 4
# Path segments after these are ids: statistics group by route, not by URL.
ID_SEGMENT: Final = re.compile(r"/(videos|uploads|chunks|comments|users)/[^/?]+")

# Videos seen by any user of this process (seeded, listed or uploaded).
known_videos: list[str] = []
rate_limited: Counter[str] = Counter()


def route(url: str) -> str:
    return ID_SEGMENT.sub(r"/\1/{id}", urlsplit(url).path)


def remember(video_ids: list[str]) -> None:
    for video_id in video_ids:
        if video_id not in known_videos:
            known_videos.append(video_id)
    del known_videos[:-KNOWN_VIDEOS_KEPT]


def new_username() -> str:
    return f"lt_{secrets.token_hex(6)}"


def generated_file(size: int) -> BytesSource:
    return BytesSource(os.urandom(size), f"loadtest-{secrets.token_hex(4)}.mp4")


class StatsSession:
    """vod_client's session protocol over locust's ``HttpSession``: named by route, a 429
    recorded as the rate limit working (not as a failure)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def request(self, method: str, url: str, **kwargs: Any) -> HttpResponse:
        name = route(url)
        with self.client.request(method, url, name=name, catch_response=True, **kwargs) as response:
            if response.status_code == HTTPStatus.TOO_MANY_REQUESTS:
                rate_limited[f"{method} {name}"] += 1
                response.success()
        result: HttpResponse = response
        return result


class PlainSession:
    """vod_client's session protocol over ``requests`` (the seed hook, outside statistics)."""

    def __init__(self, session: requests.Session) -> None:
        self.session = session

    def request(self, method: str, url: str, **kwargs: Any) -> HttpResponse:
        return self.session.request(method, url, timeout=60, **kwargs)


def client_of(user: HttpUser) -> SyncVodClient:
    return SyncVodClient("", StatsSession(user.client))


def sign_up_once(vod: SyncVodClient) -> None:
    """A new account, signed in, on the user's first visit. Part of the visit rather than
    of ``on_start``: locust lets a running visit finish when the run ends, but skips the
    first one when the end comes during ``on_start`` (a sign-up hashes a password: slow)."""
    if vod.token is None:
        username = new_username()
        vod.sign_up(username, PASSWORD)
        vod.sign_in(username, PASSWORD)


def browse_videos(vod: SyncVodClient) -> None:
    """The newest videos, and sometimes the next page."""
    page = vod.list_videos(limit=20)
    remember([video["id"] for video in page["items"]])
    if page["next_cursor"] and random.random() < 0.3:  # noqa: PLR2004
        page = vod.list_videos(limit=20, cursor=page["next_cursor"])
        remember([video["id"] for video in page["items"]])


def pick_video(vod: SyncVodClient) -> str:
    """A video someone has seen listed (browsing first when nobody has yet)."""
    if not known_videos:
        browse_videos(vod)
    if not known_videos:
        raise RescheduleTask  # an empty site: nothing to do on this visit
    return random.choice(known_videos)


# Each user's task is one visit doing what that kind of person does, in order; an
# ``ApiError`` ends the visit (locust counted the request as failed already).

# -- LOADTEST(Viewer) -----------------------------------------------------------------------


class Viewer(HttpUser):
    """Someone watching: the list, a video's page (which joins the live channel while the
    player reads ahead in 1 MiB ranges), its comments and its danmaku."""

    weight = 8
    # Think time between visits, as a person has; keeps -u N close to N people.
    wait_time = between(1, 3)

    def on_start(self) -> None:
        self.vod = client_of(self)

    @task
    def visit(self) -> None:
        with suppress(ApiError):
            browse_videos(self.vod)
            video_id = pick_video(self.vod)
            live = threading.Thread(  # a greenlet: locust's gevent patched threading
                target=hold_live, args=(self.environment, self.host or "", video_id)
            )
            live.start()
            try:
                video = self.vod.video(video_id)
                size = int(video["size"])
                for first in range(0, min(size, RANGES_PER_WATCH * RANGE_BYTES), RANGE_BYTES):
                    self.vod.read_range(video_id, first, min(RANGE_BYTES, size - first))
                self.vod.comments(video_id)
                self.vod.danmaku(video_id)
            finally:
                live.join()


class SignedInUser(HttpUser):
    """A user with an account of its own, made on its first visit; ``act`` is the rest of
    each visit."""

    abstract = True

    def on_start(self) -> None:
        self.vod = client_of(self)

    @task
    def visit(self) -> None:
        with suppress(ApiError):
            sign_up_once(self.vod)
            self.act()

    def act(self) -> None:
        raise NotImplementedError


# -- LOADTEST(Commenter) --------------------------------------------------------------------


class Commenter(SignedInUser):
    """A signed-in viewer who talks: a comment and a danmaku on a video it finds. The
    default limits (10 comments a minute, 1 danmaku a second) hold at this pace; a 429
    is counted, not failed."""

    weight = 2
    wait_time = between(4, 8)

    def act(self) -> None:
        browse_videos(self.vod)
        video_id = pick_video(self.vod)
        self.vod.comment(video_id, f"load test comment {secrets.token_hex(4)}")
        self.vod.send_danmaku(
            video_id, f"lt {secrets.token_hex(3)}", offset_ms=random.randrange(0, 60_000)
        )


# -- LOADTEST(Uploader) ---------------------------------------------------------------------


class Uploader(SignedInUser):
    """Someone publishing: a small generated file in 8 MiB chunks, then the video, then a
    look at its page."""

    weight = 1
    wait_time = between(5, 15)

    def act(self) -> None:
        video = self.vod.publish(generated_file(UPLOAD_BYTES), title="load test upload")
        remember([video["id"]])
        self.vod.video(video["id"])


# -- the live WebSocket ---------------------------------------------------------------------


def ws_url(host: str, path: str) -> str:
    parts = urlsplit(host)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{path}"


def hold_live(environment: Environment, host: str, video_id: str) -> None:
    """Joins the live channel and reads it for ``LIVE_SECONDS``. Two entries in the
    statistics: ``WS`` connect (the handshake's time) and ``WS held`` (bytes received)."""

    def fire(**request: Any) -> None:
        environment.events.request.fire(**request)  # type: ignore[no-untyped-call]  # locust's EventHook

    started = time.perf_counter()
    try:
        live = websocket.create_connection(
            ws_url(host, f"/api/v1/videos/{video_id}/live"), timeout=10
        )
    except (OSError, websocket.WebSocketException) as exc:
        fire(
            request_type="WS",
            name=LIVE_ROUTE,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=exc,
        )
        return
    fire(
        request_type="WS",
        name=LIVE_ROUTE,
        response_time=(time.perf_counter() - started) * 1000,
        response_length=0,
        exception=None,
    )
    held_from, received = time.perf_counter(), 0
    failure: Exception | None = None
    deadline = time.monotonic() + LIVE_SECONDS
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            live.settimeout(remaining)
            try:
                received += len(live.recv())
            except websocket.WebSocketTimeoutException:
                break
    except (OSError, websocket.WebSocketException) as exc:
        failure = exc
    finally:
        live.close()
    fire(
        request_type="WS held",
        name=LIVE_ROUTE,
        response_time=(time.perf_counter() - held_from) * 1000,
        response_length=received,
        exception=failure,
    )


# -- seed data and the end-of-run note -------------------------------------------------------


@events.test_start.add_listener  # type: ignore[untyped-decorator]  # locust's EventHook
def seed(environment: Environment, **_: Any) -> None:
    """Refuses a target that is not vod, then makes sure a few videos exist to watch. When
    it cannot, the run stops at once with exit code 4: users against a dead or foreign
    target would only measure connection errors."""
    host = (environment.host or "").rstrip("/")
    try:
        remember(seeded_videos(host))
    except (requests.RequestException, ValueError, ApiError) as exc:
        print(f"loadtest: cannot prepare {host}: {exc!r}")
        environment.process_exit_code = SEED_FAILED_EXIT_CODE
        if environment.runner is not None:
            # After this hook returns: quitting from inside it leaves the spawn going on.
            threading.Thread(target=environment.runner.quit).start()


def seeded_videos(host: str) -> list[str]:
    with requests.Session() as session:
        health = session.get(host + HEALTHZ, timeout=10)
        paths = session.get(host + OPENAPI, timeout=10).json().get("paths", {})
        if health.status_code != HTTPStatus.OK or "/api/v1/videos" not in paths:
            raise ValueError(f"{host} does not look like vod ({HEALTHZ}, {OPENAPI})")
        client = SyncVodClient(host, PlainSession(session))
        listed = [video["id"] for video in client.list_videos(limit=SEED_VIDEOS)["items"]]
        if len(listed) < SEED_VIDEOS:
            username = new_username()
            client.sign_up(username, PASSWORD)
            client.sign_in(username, PASSWORD)
            for number in range(SEED_VIDEOS - len(listed)):
                video = client.publish(
                    generated_file(SEED_VIDEO_BYTES), title=f"load test seed {number}"
                )
                listed.append(video["id"])
    return listed


@events.quitting.add_listener  # type: ignore[untyped-decorator]  # locust's EventHook
def at_the_end(environment: Environment, **_: Any) -> None:
    """Tallies the 429s; an exception raised in a user's task (a bug in the load test or
    the client, not a slow server) fails the run with exit code 3."""
    for name, count in sorted(rate_limited.items()):
        print(f"rate limited (429, counted as success): {name}: {count}")
    if environment.runner is not None and environment.runner.exceptions:
        environment.process_exit_code = TASK_EXCEPTION_EXIT_CODE
