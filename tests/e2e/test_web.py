"""The web page in a real browser: Debian's chromium driven by Playwright (async API)
against ``python -m standalone`` started as a process.

Skipped when /usr/bin/chromium is missing (``make browser`` installs it), unless
VOD_REQUIRE_SERVICES=1 (CI), where that is a failure. Screenshots go to
``VOD_TEST_ARTIFACTS`` when set (never committed), else to the test's tmp_path, named
``web-<test>-<step>.png``. Every test fails on a console error or an uncaught exception
in any of its pages, unless it announced it (``console.expect``): a request the test
makes fail on purpose is logged by the browser as an error.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import secrets
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import pytest
import pytest_asyncio
from av.video.frame import PictureType
from playwright.async_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Route,
    async_playwright,
    expect,
)

from tests.conftest import REQUIRE_SERVICES
from tests.e2e.processes import ROOT, free_port
from vod_client.client import VodClient
from vod_client.source import BytesSource

# One browser for the module (a launch costs about two seconds), so the tests share its loop.
pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MIB = 1024 * 1024
TIMEOUT_MS = 15_000
MAX_UPLOAD = 24 * MIB
QUOTA = 20 * MIB


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing (run `make browser`)"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (VOD_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


def playable_mp4(size: int, seed: int) -> bytes:
    """A 2 s H.264 MP4 a browser plays, padded with a trailing ``free`` box to ``size``
    bytes (players skip ``free``), so the upload has several chunks."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(20):
            frame = av.VideoFrame(64, 48, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes([(index * 10 + seed) % 256]) * plane.buffer_size)
            frame.pts = index
            frame.pict_type = PictureType.NONE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = buffer.getvalue()
    padding = size - len(video) - 8
    return video + struct.pack(">I", padding + 8) + b"free" + secrets.token_bytes(padding)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The whole of vod in one process, on free ports, in a fresh working directory."""
    _require_chromium()
    ports = {name: free_port() for name in ("gateway", "api", "stream", "scheduler")}
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "VOD_GATEWAY_PORT": str(ports["gateway"]),
        "VOD_METRICS_PORT": str(free_port()),
        "VOD_API_PORT": str(ports["api"]),
        "VOD_STREAM_PORT": str(ports["stream"]),
        "VOD_SCHEDULER_PORT": str(ports["scheduler"]),
        "VOD_API_URL": f"http://127.0.0.1:{ports['api']}",
        "VOD_STREAM_URL": f"http://127.0.0.1:{ports['stream']}",
        "VOD_SCHEDULER_URL": f"http://127.0.0.1:{ports['scheduler']}",
        # Sign-up in milliseconds, and viewer counts pushed often enough to see.
        "VOD_ARGON2_TIME_COST": "1",
        "VOD_ARGON2_MEMORY_KIB": "1024",
        "VOD_LIVE_VIEWER_INTERVAL": "0.3",
        # Small limits the error test can reach; each other test's user stays under them.
        "VOD_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "VOD_USER_QUOTA_BYTES": str(QUOTA),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "standalone"],
        cwd=tmp_path_factory.mktemp("standalone"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        # Blocks until the "vod is running" line; pytest-timeout bounds a start that hangs.
        line = process.stdout.readline().decode()
        url = f"http://127.0.0.1:{ports['gateway']}"
        assert line.startswith(f"vod is running: {url}/"), line
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(site: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def artifacts(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[Page, str], Awaitable[None]]:
    """``await shot(page, "step")`` saves a screenshot named after the test and the step."""
    folder = Path(os.environ.get("VOD_TEST_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    test_name = request.node.name.removeprefix("test_")

    async def shot(page: Page, step: str) -> None:
        await page.screenshot(path=str(folder / f"web-{test_name}-{step}.png"))

    return shot


Shot = Callable[[Page, str], Awaitable[None]]


@dataclass
class Console:
    """Console errors and uncaught exceptions of every page a test opens. A test fails on
    any it did not announce with ``expect`` (a request made to fail on purpose logs one)."""

    errors: list[str] = field(default_factory=list)
    announced: list[re.Pattern[str]] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def expect(self, pattern: str) -> None:
        self.announced.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.announced)]


ContextFactory = Callable[..., Awaitable[BrowserContext]]


def _subscribe_early(page: Page) -> None:
    """Playwright asks the browser for a page's events without waiting for the answer, so
    an ``expect_file_chooser()`` or ``expect_response()`` (or a ``page.on("request")``)
    right before the key press or click that causes the event can be overtaken by it (a
    chooser opened by Space was missed once in CI, a resumed chunk's PUT once here).
    Subscribed when the page opens, they are in place long before."""
    for event in ("filechooser", "request", "response"):
        page.on(event, lambda _event: None)


@pytest.fixture
def console() -> Console:
    return Console()


@pytest_asyncio.fixture(loop_scope="module")
async def open_context(browser: Browser, console: Console) -> AsyncIterator[ContextFactory]:
    """New browser contexts whose every page is watched by ``console``; at the end of the
    test, any console error nobody announced fails it."""
    contexts: list[BrowserContext] = []

    async def open_one(**options: Any) -> BrowserContext:
        context = await browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        context.on("page", console.watch)
        context.on("page", _subscribe_early)
        contexts.append(context)
        return context

    yield open_one
    for context in contexts:
        await context.close()
    assert console.unexpected() == [], "console errors on the page"


async def sign_up(page: Page, username: str, password: str = "pw-123456") -> None:
    await page.get_by_role("link", name="Sign up").click()
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Create account").click()
    await expect(page.get_by_test_id("who")).to_have_text(username)


async def upload(page: Page, path: Path, title: str) -> str:
    """Uploads and publishes ``path``; returns the new video's id from the page's URL."""
    await page.get_by_role("link", name="Upload").click()
    await page.get_by_label("Video file").set_input_files(str(path))
    await page.get_by_label("Title").fill(title)
    await page.get_by_role("button", name="Upload and publish").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(title)
    match = re.search(r"#/videos/(.+)$", page.url)
    assert match, page.url
    return match.group(1)


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that takes no disk space (refused before any is sent)."""
    with path.open("wb") as file:
        file.truncate(size)
    return path


async def test_journey_sign_up_upload_list_play_danmaku_delete(  # noqa: PLR0915 - one journey
    site: str, open_context: ContextFactory, console: Console, tmp_path: Path, artifacts: Shot
) -> None:
    """Issue 8, point 6, in its order, with a screenshot at each step; and on the way the
    rest of a person's first visit: sign out and in, comments, search, edit, instant upload."""
    context = await open_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    chunk_puts: list[str] = []
    page.on("request", lambda r: chunk_puts.append(r.url) if "/chunks/" in r.url else None)
    username = "web" + secrets.token_hex(3)
    heading = page.get_by_role("heading", level=1)
    await page.goto(site + "/")

    # 1. Sign up (then out and in again).
    await sign_up(page, username)
    await artifacts(page, "1-signed-up")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_text("You are signed out.")).to_be_visible()
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill("pw-123456")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_test_id("who")).to_have_text(username)

    # 2. Upload a generated MP4: 9 MiB, two chunks of the default 8 MiB, sent in parallel,
    # over a link slowed to 6 MiB/s so the progress can be seen. The hash is computed in
    # the Web Worker.
    workers: list[str] = []
    page.on("worker", lambda worker: workers.append(worker.url))
    chunk_events: list[str] = []
    page.on("request", lambda r: chunk_events.append("sent") if "/chunks/" in r.url else None)
    page.on(
        "requestfinished",
        lambda r: chunk_events.append("done") if "/chunks/" in r.url else None,
    )
    cdp = await context.new_cdp_session(page)
    await cdp.send(
        "Network.emulateNetworkConditions",
        {
            "offline": False,
            "latency": 0,
            "downloadThroughput": -1,
            "uploadThroughput": 6 * MIB,
        },
    )
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(playable_mp4(9 * MIB, seed=1))
    await page.get_by_role("link", name="Upload").click()
    await page.get_by_label("Video file").set_input_files(str(clip))
    await page.get_by_label("Title").fill("First clip")
    await page.get_by_label("Description").fill("Two seconds of changing grey.")
    await page.get_by_role("button", name="Upload and publish").click()
    # Bytes sent of the total, the speed and the time left, while the chunks are in flight.
    await expect(page.get_by_test_id("upload-figures")).to_have_text(
        re.compile(r"^[\d.]+ (KiB|MiB) of 9\.0 MiB · [\d.]+ (KiB|MiB)/s · \d+ s left$")
    )
    await artifacts(page, "2-uploading")
    await expect(heading).to_have_text("First clip")
    video_id = page.url.rsplit("/", 1)[1]
    await cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    assert len(chunk_puts) == 2
    assert chunk_events[:2] == ["sent", "sent"]  # both on their way before either is done
    assert [url.rsplit("/", 1)[1] for url in workers] == ["hash-worker.js"]
    await expect(page.get_by_text("Two seconds of changing grey.")).to_be_visible()
    await artifacts(page, "2-uploaded")

    # 3. See it in the list.
    await page.get_by_role("link", name="Videos").click()
    listed = page.get_by_role("link", name="First clip")
    await expect(listed).to_be_visible()
    await artifacts(page, "3-listed")

    # 4. Play and seek: the stream answers ranges, so the browser can jump.
    await listed.click()
    await expect(heading).to_have_text("First clip")
    player = page.get_by_role("region", name="Video player").locator("video")
    assert await player.get_attribute("src") == f"/api/v1/videos/{video_id}/stream"
    await expect(page.get_by_text(f"by {username}")).to_be_visible()
    seeked = await player.evaluate(
        """v => new Promise((resolve, reject) => {
            v.muted = true;
            v.onerror = () => reject(new Error("media error " + (v.error && v.error.code)));
            const seek = () => { v.onseeked = () => resolve(v.currentTime); v.currentTime = 1.5; };
            if (v.readyState >= 1) seek(); else v.onloadedmetadata = seek;
        })"""
    )
    assert seeked == pytest.approx(1.5, abs=0.2)
    await artifacts(page, "4-seeked")

    # 5. A second viewer sees the live count and a danmaku sent from the first page.
    viewer = await context.new_page()
    await viewer.goto(f"{site}/#/videos/{video_id}")
    await expect(viewer.get_by_test_id("viewers")).to_have_text("2 watching")
    await page.get_by_label("Danmaku", exact=True).fill("hello from page one")
    await page.get_by_label("Position").select_option("top")
    await page.get_by_role("button", name="Send").click()
    await expect(viewer.locator(".danmaku-layer .danmaku.top")).to_have_text("hello from page one")
    await artifacts(viewer, "5-danmaku-on-second-page")
    await viewer.close()
    await expect(page.get_by_test_id("viewers")).to_have_text("1 watching")

    # Comments: post one, delete it.
    await page.get_by_label("Add a comment").fill("Nice clip")
    await page.get_by_role("button", name="Post comment").click()
    comment = page.locator(".comment", has_text="Nice clip")
    await expect(comment).to_be_visible()
    await comment.get_by_role("button", name="Delete comment").click()
    await expect(comment).to_have_count(0)

    # Search.
    await page.get_by_role("link", name="Videos").click()
    await page.get_by_label("Search videos").fill("First")
    await page.get_by_role("button", name="Search").click()
    await expect(page.get_by_role("link", name="First clip")).to_be_visible()
    await page.get_by_label("Search videos").fill("no-such-words")
    await page.get_by_role("button", name="Search").click()
    await expect(page.get_by_text("No videos match")).to_be_visible()

    # The owner edits it.
    await page.goto(f"{site}/#/videos/{video_id}")
    await page.get_by_role("button", name="Edit").click()
    await page.get_by_label("Title").fill("Renamed clip")
    await page.get_by_label("Description").fill("Now with a new description.")
    await page.get_by_role("button", name="Save").click()
    await expect(heading).to_have_text("Renamed clip")
    await expect(page.get_by_text("Now with a new description.")).to_be_visible()
    await page.reload()
    await expect(heading).to_have_text("Renamed clip")
    await expect(page.get_by_text("Now with a new description.")).to_be_visible()

    # The same file again completes instantly, by proof, without sending a chunk.
    again = await upload(page, clip, "Same clip")
    assert again != video_id
    assert len(chunk_puts) == 2

    # 6. Delete: the video leaves the list, and its page says it is gone.
    await page.get_by_role("button", name="Delete", exact=True).click()
    await page.get_by_role("button", name="Yes, delete").click()
    await expect(heading).to_have_text("Videos")
    await expect(page.get_by_role("link", name="Renamed clip")).to_be_visible()
    await expect(page.get_by_role("link", name="Same clip")).to_have_count(0)
    await artifacts(page, "6-deleted")
    console.expect(r"status of 404 ")  # the deleted video's page, opened on purpose
    await page.goto(f"{site}/#/videos/{again}")
    await expect(heading).to_have_text("This video does not exist (any more).")


async def test_upload_errors_are_shown_in_words(  # noqa: PLR0915 - one page, four failures
    site: str,
    open_context: ContextFactory,
    console: Console,
    tmp_path: Path,
    artifacts: Shot,
) -> None:
    # The browser logs each refused or dropped request; these ones are provoked here.
    console.expect(r"status of 413 ")
    console.expect(r"net::ERR_INTERNET_DISCONNECTED")
    console.expect(r"status of 401 \(Unauthorized\)")
    context = await open_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(site + "/")
    await sign_up(page, "errs" + secrets.token_hex(3))
    alert = page.get_by_role("alert")
    submit = page.get_by_role("button", name="Upload and publish")

    # Larger than VOD_MAX_UPLOAD_BYTES.
    await page.get_by_role("link", name="Upload").click()
    await page.get_by_label("Video file").set_input_files(
        str(sparse_file(tmp_path / "huge.mp4", MAX_UPLOAD + MIB))
    )
    await submit.click()
    await expect(alert).to_have_text(
        "This file is too big: the largest upload allowed is 24.0 MiB."
    )
    await expect(page.get_by_role("progressbar")).to_be_hidden()
    await artifacts(page, "too-big")

    # Fits the size limit, not the 20 MiB VOD_USER_QUOTA_BYTES.
    await page.get_by_label("Video file").set_input_files(
        str(sparse_file(tmp_path / "large.mp4", QUOTA + MIB))
    )
    await expect(page.get_by_label("Title")).to_have_value("large")  # follows the file
    await submit.click()
    await expect(alert).to_have_text(
        "Not enough room in your storage: this file needs 21.0 MiB, and 20.0 MiB of your"
        " 20.0 MiB are free. Delete videos or unfinished uploads to make room."
    )
    await artifacts(page, "over-quota")

    # The connection drops mid-upload: chunk 1 fails as the browser goes offline. The page
    # says so, waits, and carries on by itself once the browser is back online.
    chunk_one_tries = 0

    async def go_offline_once(route: Route) -> None:
        nonlocal chunk_one_tries
        chunk_one_tries += 1
        if chunk_one_tries == 1:
            await context.set_offline(True)
            await route.abort("internetdisconnected")
        else:
            await route.continue_()

    clip = tmp_path / "offline.mp4"
    clip.write_bytes(playable_mp4(9 * MIB, seed=3))
    await page.route("**/chunks/1", go_offline_once)
    await page.get_by_label("Video file").set_input_files(str(clip))
    await page.get_by_label("Title").fill("Offline clip")
    await submit.click()
    status = page.get_by_test_id("upload-status")
    await expect(status).to_have_text(
        "You are offline: the upload will continue when the connection is back."
    )
    await expect(alert).to_be_hidden()
    await expect(page.get_by_label("Title")).to_have_value("Offline clip")
    await artifacts(page, "offline")
    await context.set_offline(False)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Offline clip")
    assert chunk_one_tries == 2

    # The session is revoked elsewhere (signed out on another device): the next action
    # that needs it sends the page back to sign-in, saying why.
    access = await page.evaluate("JSON.parse(localStorage['vod.session']).access_token")
    revoked = await page.request.delete(
        site + "/api/v1/sessions", headers={"Authorization": f"Bearer {access}"}
    )
    assert revoked.status == 204
    await page.get_by_role("button", name="Edit").click()
    await page.get_by_label("Title").fill("Never saved")
    await page.get_by_role("button", name="Save").click()
    await expect(page.get_by_text("Your session has ended. Please sign in again.")).to_be_visible()
    await expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    await expect(page.get_by_role("link", name="Sign up")).to_be_visible()
    await artifacts(page, "session-ended")


async def tab_to(page: Page, target: Locator, key: str = "Tab", limit: int = 40) -> None:
    """Presses ``key`` until ``target`` has the focus, as a keyboard user would. Every
    element the focus stops at on the way must show it (the UA's controls inside the
    video draw their own)."""
    for _ in range(limit):
        await page.keyboard.press(key)
        stop = await page.evaluate(
            """() => {
                const el = document.activeElement;
                const visible = el.tagName === "VIDEO" || (el.matches(":focus-visible")
                    && getComputedStyle(el).outlineStyle !== "none");
                return {visible, what: el.outerHTML.slice(0, 80)};
            }"""
        )
        assert stop["visible"], f"focus not visible on {stop['what']}"
        if await target.evaluate("el => el === document.activeElement"):
            return
    raise AssertionError(f"{target} not reached with {key} in {limit} presses")


async def test_keyboard_only(  # noqa: PLR0915 - one visit, key by key
    site: str, open_context: ContextFactory, tmp_path: Path, artifacts: Shot
) -> None:
    context = await open_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(site + "/")
    keys = page.keyboard
    # The first Tab lands on the skip link, which moves the focus to the content.
    await keys.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    await keys.press("Enter")
    await expect(page.locator("main")).to_be_focused()

    # Sign up: the link, the two fields, Enter submits.
    await tab_to(page, page.get_by_role("link", name="Sign up"), "Shift+Tab")
    await keys.press("Enter")
    await expect(page.get_by_role("heading", name="Create an account")).to_be_focused()
    username = "keys" + secrets.token_hex(3)
    await tab_to(page, page.get_by_label("Username"))
    await keys.type(username)
    await keys.press("Tab")
    await expect(page.get_by_label("Password")).to_be_focused()
    await keys.type("pw-123456")
    await keys.press("Enter")
    await expect(page.get_by_test_id("who")).to_have_text(username)

    # Upload: the file picker opens from the keyboard; Enter in the title submits.
    clip = tmp_path / "keyboard.mp4"
    clip.write_bytes(playable_mp4(256 * 1024, seed=4))
    await tab_to(page, page.get_by_role("link", name="Upload"), "Shift+Tab")
    await keys.press("Enter")
    # The new view moves the focus to its heading; a Tab pressed before that would be
    # overtaken by it.
    await expect(page.get_by_role("heading", name="Upload a video")).to_be_focused()
    await tab_to(page, page.get_by_label("Video file"))
    async with page.expect_file_chooser() as chooser:
        await keys.press("Space")
    await (await chooser.value).set_files(str(clip))
    await keys.press("Tab")
    await expect(page.get_by_label("Title")).to_have_value("keyboard")
    await keys.press("ControlOrMeta+A")
    await keys.type("Keyboard clip")
    await keys.press("Enter")
    heading = page.get_by_role("heading", level=1)
    await expect(heading).to_have_text("Keyboard clip")

    # The player's controls, then a danmaku: text, position (arrow keys), colour, Send.
    await tab_to(
        page, page.get_by_role("region", name="Video player").locator("video"), "Shift+Tab"
    )
    await tab_to(page, page.get_by_label("Danmaku", exact=True))
    await keys.type("typed, not clicked")
    await keys.press("Tab")
    await expect(page.get_by_label("Position")).to_be_focused()
    await keys.press("ArrowDown")
    await expect(page.get_by_label("Position")).to_have_value("top")
    await keys.press("Tab")
    await expect(page.get_by_label("Colour")).to_be_focused()
    await tab_to(page, page.get_by_role("button", name="Send"))
    await artifacts(page, "send-focused")
    await keys.press("Enter")
    await expect(page.locator(".danmaku-layer .danmaku.top")).to_have_text("typed, not clicked")

    # A comment, posted and deleted.
    await tab_to(page, page.get_by_label("Add a comment"))
    await keys.type("from the keyboard")
    await tab_to(page, page.get_by_role("button", name="Post comment"))
    await keys.press("Enter")
    comment = page.locator(".comment", has_text="from the keyboard")
    await expect(comment).to_be_visible()
    await tab_to(page, comment.get_by_role("button", name="Delete comment"), "Shift+Tab")
    await keys.press("Enter")
    await expect(comment).to_have_count(0)

    # Delete the video: the confirmation takes the focus; Enter confirms.
    await tab_to(page, page.get_by_role("button", name="Delete", exact=True), "Shift+Tab")
    await keys.press("Enter")
    await expect(page.get_by_role("button", name="Yes, delete")).to_be_focused()
    await keys.press("Enter")
    await expect(heading).to_have_text("Videos")
    await expect(page.get_by_role("link", name="Keyboard clip")).to_have_count(0)


async def test_danmaku_layer_style_and_modes(
    site: str, open_context: ContextFactory, tmp_path: Path, artifacts: Shot
) -> None:
    context = await open_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(site + "/")
    await sign_up(page, "paint" + secrets.token_hex(3))
    clip = tmp_path / "style.mp4"
    clip.write_bytes(playable_mp4(128 * 1024, seed=5))
    await upload(page, clip, "Styled danmaku")

    async def send(text: str, mode: str, colour: str | None = None) -> Locator:
        await page.get_by_label("Danmaku", exact=True).fill(text)
        await page.get_by_label("Position").select_option(mode)
        if colour:
            await page.get_by_label("Colour").fill(colour)
        await page.get_by_role("button", name="Send").click()
        sent = page.locator(f".danmaku-layer .danmaku.{mode}", has_text=text)
        await expect(sent).to_be_visible()
        return sent

    scrolling = await send("white by default", "scroll")
    bottom = await send("also white", "bottom")
    top = await send("in red", "top", "#ff0000")
    await artifacts(page, "layer")

    video = await page.locator(".player video").bounding_box()
    layer = await page.locator(".danmaku-layer").bounding_box()
    assert video
    assert layer
    # Over the picture, leaving the native controls at the bottom free.
    assert layer["x"] == video["x"]
    assert layer["width"] == video["width"]
    assert layer["y"] == video["y"]
    assert layer["height"] < video["height"]

    style = """el => { const s = getComputedStyle(el);
        return {color: s.color, shadow: s.textShadow, animation: s.animationName,
                background: s.backgroundColor}; }"""
    white, red = "rgb(255, 255, 255)", "rgb(255, 0, 0)"
    for item, colour in ((scrolling, white), (bottom, white), (top, red)):
        looks = await item.evaluate(style)
        assert looks["color"] == colour
        assert looks["background"] == "rgba(0, 0, 0, 0)"  # only the text covers the picture
        # A dark outline on all four sides: readable on a white frame as on a black one.
        assert looks["shadow"].count("rgb(0, 0, 0)") >= 4, looks

    # Top and bottom stay put, centred at the layer's edge; scrolling runs right to left.
    top_box, bottom_box = await top.bounding_box(), await bottom.bounding_box()
    assert top_box
    assert bottom_box
    for box in (top_box, bottom_box):
        assert abs(box["x"] + box["width"] / 2 - (layer["x"] + layer["width"] / 2)) < 2
    assert top_box["y"] - layer["y"] < layer["height"] * 0.15
    assert layer["y"] + layer["height"] - (bottom_box["y"] + bottom_box["height"]) < (
        layer["height"] * 0.15
    )
    assert (await scrolling.evaluate(style))["animation"] == "danmaku-scroll"
    start = await scrolling.evaluate("el => el.getBoundingClientRect().x")
    await page.wait_for_function(
        "([el, start]) => el.getBoundingClientRect().x < start - 50",
        arg=[await scrolling.element_handle(), start],
    )


async def test_phone_layout_resume_refresh_and_expiry(
    site: str,
    open_context: ContextFactory,
    console: Console,
    tmp_path: Path,
    artifacts: Shot,
) -> None:
    # Provoked below: the chunk the test cuts off, and the two 401s of a dead session.
    console.expect(r"net::ERR_FAILED")
    console.expect(r"status of 401 \(Unauthorized\)")
    context = await open_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = await context.new_page()
    # Page time under the test's control: jumping ahead fires the silent-refresh timer.
    await page.clock.install()
    await page.goto(site + "/")
    await sign_up(page, "phone" + secrets.token_hex(3))
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390

    # Silent refresh: 14 of the access token's 15 minutes pass, a new pair arrives.
    before = await page.evaluate("JSON.parse(localStorage['vod.session']).access_token")
    async with page.expect_response("**/api/v1/sessions/refresh") as refreshed:
        await page.clock.fast_forward("14:30")
    assert (await refreshed.value).status == 200
    # The response event fires on its headers; the page stores the new pair once it has
    # read the body, a moment later (polled from here: the page's own timers are frozen).
    stored = "JSON.parse(localStorage['vod.session']).access_token"
    for _ in range(100):
        if await page.evaluate(stored) != before:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the refreshed session was never stored")

    # Resume: chunk 1 cannot get through, the page is reloaded mid-upload, the same file
    # is picked again, and only the missing chunk is sent.
    clip = tmp_path / "phone.mp4"
    clip.write_bytes(playable_mp4(9 * MIB, seed=2))
    await page.route("**/chunks/1", lambda route: route.abort())
    await page.get_by_role("link", name="Upload").click()
    await page.get_by_label("Video file").set_input_files(str(clip))
    await page.get_by_label("Title").fill("Phone clip")
    async with page.expect_response("**/chunks/0"):
        await page.get_by_role("button", name="Upload and publish").click()
    await expect(page.get_by_test_id("upload-status")).to_contain_text("Connection lost")
    await expect(page.get_by_role("progressbar")).to_be_visible()
    await artifacts(page, "upload")
    # Reloaded before chunk 1 may pass again: the page retries it on a timer, and a retry
    # slipping through first would finish the upload before the reload (seen in CI).
    await page.reload()
    await page.unroute("**/chunks/1")
    puts: list[str] = []
    page.on("request", lambda r: puts.append(r.url) if "/chunks/" in r.url else None)
    await page.get_by_label("Video file").set_input_files(str(clip))
    await page.get_by_label("Title").fill("Phone clip")
    await page.get_by_role("button", name="Upload and publish").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Phone clip")
    assert [url.rsplit("/", 1)[1] for url in puts] == ["1"]
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await artifacts(page, "video")

    # A session the server no longer honours leads back to the sign-in form, in words.
    await page.evaluate(
        """() => {
            const s = JSON.parse(localStorage['vod.session']);
            s.access_token = 'expired';
            localStorage['vod.session'] = JSON.stringify(s);
        }"""
    )
    await context.clear_cookies()
    await page.reload()
    await expect(page.get_by_text("Your session has ended. Please sign in again.")).to_be_visible()
    await expect(page.get_by_role("button", name="Sign in")).to_be_visible()


async def test_the_refresh_token_is_out_of_the_pages_reach_and_refresh_survives_a_reload(
    site: str, open_context: ContextFactory, artifacts: Shot
) -> None:
    context = await open_context()
    page = await context.new_page()
    await page.goto(site + "/")
    await sign_up(page, "cookie" + secrets.token_hex(3))
    cookies = {cookie["name"]: cookie for cookie in await context.cookies()}
    assert set(cookies) == {"vod_refresh", "vod_device"}
    for cookie in cookies.values():
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/api/v1/sessions"
    # Everything a script on the page can read: no refresh token, no device id.
    readable = await page.evaluate(
        """() => JSON.stringify([
            Object.entries(localStorage), Object.entries(sessionStorage), document.cookie,
        ])"""
    )
    assert "refresh" not in readable
    for cookie in cookies.values():
        assert cookie["value"] not in readable
    assert await page.evaluate("document.cookie") == ""

    # Reloaded with its access token expired: the page refreshes silently (the browser
    # sends the cookies) and is still signed in; the refresh cookie has rotated.
    await page.evaluate(
        """() => {
            const s = JSON.parse(localStorage['vod.session']);
            s.access_token = 'expired'; s.expires_at = Date.now() - 1000;
            localStorage['vod.session'] = JSON.stringify(s);
        }"""
    )
    async with page.expect_response("**/api/v1/sessions/refresh") as refreshed:
        await page.reload()
    response = await refreshed.value
    assert response.status == 200
    assert response.request.post_data is None
    assert "refresh_token" not in await response.json()
    await expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    await expect(page.get_by_role("link", name="Upload")).to_be_visible()
    rotated = {cookie["name"]: cookie["value"] for cookie in await context.cookies()}
    assert rotated["vod_refresh"] != cookies["vod_refresh"]["value"]
    assert rotated["vod_device"] == cookies["vod_device"]["value"]
    await artifacts(page, "refreshed")

    # Signing out clears the cookies too.
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_text("You are signed out.")).to_be_visible()
    assert await context.cookies() == []


async def test_stored_danmaku_show_at_their_offsets_during_playback(
    site: str, open_context: ContextFactory, artifacts: Shot
) -> None:
    """Danmaku sent earlier (by someone else) appear when playback reaches their offset."""
    username = "offs" + secrets.token_hex(3)
    async with VodClient(site) as client:
        await client.request(
            "POST", "/api/v1/users", json={"username": username, "password": "pw-123456"}
        )
        await client.sign_in(username, "pw-123456")
        video = await client.publish(
            BytesSource(playable_mp4(128 * 1024, seed=6), "offsets.mp4"), title="Offsets"
        )
        for offset_ms, text in ((0, "at the start"), (1200, "at 1.2 s")):
            await client.request(
                "POST",
                f"/api/v1/videos/{video['id']}/danmaku",
                json={
                    "offset_ms": offset_ms,
                    "content": text,
                    "mode": "scroll",
                    "color": "#00ff00",
                },
            )
    context = await open_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    async with page.expect_response(re.compile(r"/danmaku\?from_ms=0&")):
        await page.goto(f"{site}/#/videos/{video['id']}")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Offsets")
    layer = page.locator(".danmaku-layer .danmaku")
    await expect(page.get_by_test_id("viewers")).to_have_text("1 watching")
    await expect(layer).to_have_count(0)  # nothing before playing
    # The player's position at the moment each danmaku enters the layer.
    appeared_at = await page.locator(".player").evaluate(
        """player => new Promise((resolve, reject) => {
            const video = player.querySelector("video");
            const seen = {};
            new MutationObserver(records => {
                for (const record of records) for (const node of record.addedNodes) {
                    seen[node.textContent] = video.currentTime;
                }
                if (Object.keys(seen).length === 2) resolve(seen);
            }).observe(player.querySelector(".danmaku-layer"), {childList: true});
            video.onended = () => reject(new Error("ended; shown: " + JSON.stringify(seen)));
            video.muted = true;
            video.play().catch(reject);
        })"""
    )
    await artifacts(page, "playing")
    # Never early; late by at most a few of the player's time updates (every 250 ms).
    assert appeared_at["at the start"] < 0.6
    assert 1.2 <= appeared_at["at 1.2 s"] < 1.8


async def test_video_list_pages_through_an_authors_videos(
    site: str, open_context: ContextFactory
) -> None:
    username = "many" + secrets.token_hex(3)
    clip = BytesSource(playable_mp4(64 * 1024, seed=7), "many.mp4")
    async with VodClient(site) as client:
        await client.request(
            "POST", "/api/v1/users", json={"username": username, "password": "pw-123456"}
        )
        await client.sign_in(username, "pw-123456")
        # The first is sent, the other twelve complete instantly: a page and one more.
        for number in range(13):
            await client.publish(clip, title=f"Part {number:02}")
    context = await open_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"{site}/#/?author={username}")
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Videos by {username}")
    cards = page.get_by_role("list", name="Videos").get_by_role("listitem")
    await expect(cards).to_have_count(12)
    more = page.get_by_role("button", name="Load more")
    await more.click()
    await expect(cards).to_have_count(13)
    await expect(more).to_be_hidden()
    titles = await page.locator(".video-title").all_text_contents()
    assert sorted(titles) == [f"Part {number:02}" for number in range(13)]
