"""A real player plays and seeks a stored MP4 through the gateway (issue 5, point 6).

FFmpeg (through PyAV) is the player: it opens the stream URL over HTTP, decodes, and
seeks. The MP4 is written the plain way, its index (``moov``) after the media, so FFmpeg
must ask for the end of the file by a range request before it can play at all, then for
the middle when it seeks: the demuxer works only if ranges do. The stack is the four apps
in the test's loop; FFmpeg's blocking I/O runs in a thread.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
from dataclasses import dataclass
from fractions import Fraction

import av
import pytest
from prometheus_client import generate_latest

from shared.web import METRICS
from tests.clients import Publisher
from tests.stack import Stack

pytestmark = pytest.mark.e2e

FPS = 25
SECONDS = 4
WIDTH, HEIGHT = 320, 240
SEEK_TO = 2.5  # seconds; keyframes every second, so the seek lands on the one at 2.0
PLAYER_TIMEOUT = 20.0  # seconds FFmpeg may wait on a socket before it gives up


def make_mp4() -> bytes:
    """A real H.264 MP4: ``SECONDS`` at ``FPS``, a keyframe every second."""
    output = io.BytesIO()
    noise = [os.urandom(WIDTH * HEIGHT * 3) for _ in range(FPS)]
    with av.open(output, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = FPS
        # A fixed GOP: no extra keyframes at scene cuts of the synthetic picture.
        stream.codec_context.options = {"sc_threshold": "0", "preset": "ultrafast"}
        for index in range(FPS * SECONDS):
            frame = av.VideoFrame(WIDTH, HEIGHT, "rgb24")
            # Noise compresses badly: megabytes of media, so FFmpeg cannot take the whole
            # file in its first read and must ask for the parts it needs.
            frame.planes[0].update(noise[index % len(noise)])
            frame = frame.reformat(format="yuv420p")
            frame.pts = index
            frame.time_base = Fraction(1, FPS)
            # A synthetic source marks every frame as a keyframe unless told otherwise.
            frame.pict_type = av.video.frame.PictureType.NONE
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return output.getvalue()


@dataclass(frozen=True)
class Playback:
    frames: int
    keyframes: int
    duration: float
    first_after_seek: float


def play_and_seek(url: str) -> Playback:
    """What a player does: open, decode every frame, seek to the middle, decode again."""
    with av.open(url, timeout=PLAYER_TIMEOUT) as container:
        stream = container.streams.video[0]
        assert stream.time_base is not None
        frames = keyframes = 0
        for frame in container.decode(stream):
            frames += 1
            keyframes += frame.key_frame
        duration = float(container.duration or 0) / av.time_base
        container.seek(int(SEEK_TO / stream.time_base), stream=stream)
        first = next(container.decode(stream))
        assert first.pts is not None
        return Playback(frames, keyframes, duration, float(first.pts * stream.time_base))


async def test_ffmpeg_plays_and_seeks_a_published_mp4(stack: Stack) -> None:
    data = await asyncio.to_thread(make_mp4)
    # moov after mdat: opening needs a range request for the end of the file.
    assert data.index(b"moov") > data.index(b"mdat")
    publisher = Publisher(stack, "cinephile", await stack.new_user("cinephile"))
    response = await publisher.publish(upload_id=await publisher.upload(data))
    assert response.status == 201, await response.text()
    video = await response.json()
    url = str(stack.gateway.make_url(video["stream_url"]))

    playback = await asyncio.to_thread(play_and_seek, url)

    assert playback.frames == FPS * SECONDS
    assert playback.keyframes == SECONDS
    assert playback.duration == pytest.approx(SECONDS, abs=0.1)
    # Landed on the keyframe at or before the target: within one GOP of it.
    assert SEEK_TO - 1 <= playback.first_after_seek <= SEEK_TO
    # FFmpeg got partial content through the gateway, not one long read.
    metrics = generate_latest(stack.gateway.app[METRICS].registry).decode()
    partial = re.search(
        r'^vod_http_requests_total\{[^}]*route="/api/v1/videos/\{id\}/stream"[^}]*'
        r'status="206"[^}]*\} (\d+)',
        metrics,
        re.MULTILINE,
    )
    assert partial is not None, metrics
    assert int(partial[1]) >= 2, metrics  # the index at the end, then the seek
