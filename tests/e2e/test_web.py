"""The web page in a real browser: Debian's chromium driven by Playwright (async API)
against ``python -m standalone`` started as a process.

Skipped when /usr/bin/chromium is missing (``make browser`` installs it), unless
VOD_REQUIRE_SERVICES=1 (CI), where that is a failure. Screenshots go to
``VOD_TEST_ARTIFACTS`` when set (never committed), else to the test's tmp_path.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import av
import pytest
from av.video.frame import PictureType
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.conftest import REQUIRE_SERVICES
from tests.e2e.processes import ROOT, free_port

pytestmark = pytest.mark.e2e

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


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("VOD_TEST_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def console_errors(page: Page) -> list[str]:
    """Every console error and uncaught exception of ``page``, collected as they happen."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    return errors


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


async def test_sign_up_upload_watch_edit_delete(  # noqa: PLR0915 - one journey, in order
    site: str, browser: Browser, tmp_path: Path, artifacts: Path
) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    errors = console_errors(page)
    chunk_puts: list[str] = []
    page.on("request", lambda r: chunk_puts.append(r.url) if "/chunks/" in r.url else None)
    username = "web" + secrets.token_hex(3)
    await page.goto(site + "/")

    await sign_up(page, username)
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_text("You are signed out.")).to_be_visible()
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill("pw-123456")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_test_id("who")).to_have_text(username)

    # 9 MiB: two chunks of the default 8 MiB, sent in parallel.
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(playable_mp4(9 * MIB, seed=1))
    video_id = await upload(page, clip, "First clip")
    assert len(chunk_puts) == 2
    player = page.locator("video")
    assert await player.get_attribute("src") == f"/api/v1/videos/{video_id}/stream"
    await expect(page.get_by_text(f"by {username}")).to_be_visible()
    # Plays and seeks: the stream answers ranges, so the browser can jump.
    seeked = await player.evaluate(
        """v => new Promise((resolve, reject) => {
            v.muted = true;
            v.onerror = () => reject(new Error("media error " + (v.error && v.error.code)));
            const seek = () => { v.onseeked = () => resolve(v.currentTime); v.currentTime = 1.5; };
            if (v.readyState >= 1) seek(); else v.onloadedmetadata = seek;
        })"""
    )
    assert seeked == pytest.approx(1.5, abs=0.2)

    # A second viewer sees the live count and a danmaku sent from the first page.
    viewer = await context.new_page()
    viewer_errors = console_errors(viewer)
    await viewer.goto(f"{site}/#/videos/{video_id}")
    await expect(viewer.get_by_test_id("viewers")).to_have_text("2 watching")
    await page.get_by_label("Danmaku").fill("hello from page one")
    await page.get_by_label("Position").select_option("top")
    await page.get_by_role("button", name="Send").click()
    await expect(viewer.locator(".danmaku-layer .danmaku.top")).to_have_text("hello from page one")
    await viewer.screenshot(path=str(artifacts / "web-danmaku.png"))
    await viewer.close()

    # Comments: post one, delete it.
    await page.get_by_label("Add a comment").fill("Nice clip")
    await page.get_by_role("button", name="Post comment").click()
    comment = page.locator(".comment", has_text="Nice clip")
    await expect(comment).to_be_visible()
    await comment.get_by_role("button", name="Delete comment").click()
    await expect(comment).to_have_count(0)

    # Listed and searchable.
    await page.get_by_role("link", name="Videos").click()
    await expect(page.get_by_role("link", name="First clip")).to_be_visible()
    await page.get_by_label("Search videos").fill("First")
    await page.get_by_role("button", name="Search").click()
    await expect(page.get_by_role("link", name="First clip")).to_be_visible()
    await page.get_by_label("Search videos").fill("no-such-words")
    await page.get_by_role("button", name="Search").click()
    await expect(page.get_by_text("No videos match")).to_be_visible()
    await page.screenshot(path=str(artifacts / "web-list.png"))

    # The owner edits it.
    await page.goto(f"{site}/#/videos/{video_id}")
    await page.get_by_role("button", name="Edit").click()
    await page.get_by_label("Title").fill("Renamed clip")
    await page.get_by_role("button", name="Save").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Renamed clip")
    await page.screenshot(path=str(artifacts / "web-video.png"))

    # The same file again completes instantly, by proof, without sending a chunk.
    again = await upload(page, clip, "Same clip")
    assert again != video_id
    assert len(chunk_puts) == 2

    # And deleting takes it out of the list.
    await page.get_by_role("button", name="Delete", exact=True).click()
    await page.get_by_role("button", name="Yes, delete").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Videos")
    await expect(page.get_by_role("link", name="Renamed clip")).to_be_visible()
    await expect(page.get_by_role("link", name="Same clip")).to_have_count(0)

    assert errors == []
    assert viewer_errors == []
    await context.close()


async def test_phone_layout_resume_refresh_and_expiry(
    site: str, browser: Browser, tmp_path: Path, artifacts: Path
) -> None:
    context = await browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    errors = console_errors(page)
    # Page time under the test's control: jumping ahead fires the silent-refresh timer.
    await page.clock.install()
    await page.goto(site + "/")
    # Keyboard first: the first Tab lands on the skip link.
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("main")).to_be_focused()
    await sign_up(page, "phone" + secrets.token_hex(3))
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390

    # Silent refresh: 14 of the access token's 15 minutes pass, a new pair arrives.
    before = await page.evaluate("JSON.parse(localStorage['vod.session']).refresh_token")
    async with page.expect_response("**/api/v1/sessions/refresh") as refreshed:
        await page.clock.fast_forward("14:30")
    assert (await refreshed.value).status == 200
    after = await page.evaluate("JSON.parse(localStorage['vod.session']).refresh_token")
    assert after != before

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
    await page.screenshot(path=str(artifacts / "web-phone-upload.png"))
    await page.unroute("**/chunks/1")
    await page.reload()
    errors.clear()  # the aborted chunk was logged as a failed request, on purpose
    puts: list[str] = []
    page.on("request", lambda r: puts.append(r.url) if "/chunks/" in r.url else None)
    await page.get_by_label("Video file").set_input_files(str(clip))
    await page.get_by_label("Title").fill("Phone clip")
    await page.get_by_role("button", name="Upload and publish").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Phone clip")
    assert [url.rsplit("/", 1)[1] for url in puts] == ["1"]
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await page.screenshot(path=str(artifacts / "web-phone-video.png"))

    # A session the server no longer honours leads back to the sign-in form, in words.
    await page.evaluate(
        """() => {
            const s = JSON.parse(localStorage['vod.session']);
            s.access_token = 'expired'; s.refresh_token = 'spent';
            localStorage['vod.session'] = JSON.stringify(s);
        }"""
    )
    await page.reload()
    await expect(page.get_by_text("Your session has ended. Please sign in again.")).to_be_visible()
    await expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    # Only the two 401s the test provoked, which the browser logs as failed requests.
    assert all("401" in message for message in errors), errors
    await context.close()
