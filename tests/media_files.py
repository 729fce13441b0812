"""Small real media files for tests, made with PyAV (no fixture files in the repo)."""

from __future__ import annotations

import io

import av
from av.video.frame import PictureType

WIDTH, HEIGHT, FPS, FRAMES = 64, 48, 10, 20  # two seconds


def tiny_mp4(frames: int = FRAMES) -> bytes:
    """An MPEG-4 video of ``frames`` flat grey frames at 10 fps, a few KiB."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes([(index * 10) % 256]) * plane.buffer_size)
            frame.pts = index
            # A synthetic source marks every frame as a keyframe unless told otherwise.
            frame.pict_type = PictureType.NONE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


NOT_MEDIA = b"this is a plain text file, not a video\n" * 50
