"""GET/HEAD of a video's bytes and of its thumbnail."""

from __future__ import annotations

import functools
from datetime import datetime
from email.utils import format_datetime

from aiohttp import web

from shared.errors import NotFoundError
from shared.layout import thumbnail_key
from shared.resources import BLOBS
from shared.web import SETTINGS, problem_response
from stream_service.keys import CATALOG, LIMITER, OPEN_FILES, STREAM_METRICS
from stream_service.streaming.catalog import StreamableVideo
from stream_service.streaming.ranges import Outcome, decide, strong_etag
from stream_service.streaming.send import RangeResponse, send_range

# Content-addressed bytes never change: caches and browsers may keep them for a year.
IMMUTABLE = "public, max-age=31536000, immutable"


def client_address(request: web.Request) -> str:
    """The client as the gateway saw it (the last X-Forwarded-For hop, which it set)."""
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    return hops[-1] if hops else (request.remote or "unknown")


def _video_not_found(video_id: str) -> NotFoundError:
    return NotFoundError(f"No video {video_id!r}.", code="video_not_found")


@functools.lru_cache(maxsize=1024)
def _fixed_headers(content_hash: str, modified: datetime) -> tuple[tuple[str, str], ...]:
    # The same for every range of a film: formatted once, not per request.
    return (
        ("Accept-Ranges", "bytes"),
        ("ETag", strong_etag(content_hash)),
        ("Last-Modified", format_datetime(modified.replace(microsecond=0), usegmt=True)),
        ("Cache-Control", IMMUTABLE),
    )


def _headers(video: StreamableVideo) -> dict[str, str]:
    return dict(_fixed_headers(video.content_hash, video.modified))


async def stream_video(request: web.Request) -> web.StreamResponse:
    video_id = request.match_info["video_id"]
    video = await request.app[CATALOG].find(video_id)
    if video is None:
        raise _video_not_found(video_id)
    headers = _headers(video)
    decision = decide(
        method=request.method,
        size=video.size,
        etag=headers["ETag"],
        last_modified=video.modified,
        range_header=request.headers.get("Range"),
        if_range=request.headers.get("If-Range"),
        if_none_match=request.headers.get("If-None-Match"),
        if_modified_since=request.headers.get("If-Modified-Since"),
    )
    if decision.outcome is Outcome.NOT_MODIFIED:
        return web.Response(status=304, headers=headers)
    if decision.outcome is Outcome.UNSATISFIABLE:
        return problem_response(
            status=416,
            code="range_not_satisfiable",
            title="Range Not Satisfiable",
            detail=f"The video has {video.size} bytes; no requested range lies within them.",
            headers=headers | {"Content-Range": f"bytes */{video.size}"},
        )
    response = RangeResponse(status=decision.outcome.value, headers=headers)
    response.content_type = video.media_type
    response.content_length = decision.length
    if decision.outcome is Outcome.PARTIAL:
        response.headers["Content-Range"] = f"bytes {decision.start}-{decision.end}/{video.size}"
    if request.method == "HEAD" or decision.length == 0:
        await response.prepare(request)
        await response.write_eof()
        return response
    # The slot is taken before the first byte and freed when sending ends for any
    # reason, a client hanging up included.
    with request.app[LIMITER].slot(client_address(request)):
        await response.prepare(request)
        await send_range(
            request,
            response,
            blobs=request.app[BLOBS],
            files=request.app[OPEN_FILES],
            key=video.blob_key,
            start=decision.start,
            length=decision.length,
            on_bytes=request.app[STREAM_METRICS].bytes_sent.inc,
            stall_seconds=request.app[SETTINGS].stream_stall_seconds,
        )
    return response


async def get_thumbnail(request: web.Request) -> web.StreamResponse:
    video_id = request.match_info["video_id"]
    video = await request.app[CATALOG].find(video_id)
    if video is None:
        raise _video_not_found(video_id)
    key = thumbnail_key(video.content_hash)
    blobs = request.app[BLOBS]
    info = await blobs.stat(key)
    if info is None:
        raise NotFoundError("This video has no thumbnail yet.", code="thumbnail_not_found")
    response = web.StreamResponse(headers={"Cache-Control": "public, max-age=86400"})
    response.content_type = "image/jpeg"
    response.content_length = info.size
    await response.prepare(request)
    if request.method == "HEAD":
        await response.write_eof()
        return response
    await send_range(
        request,
        response,
        blobs=blobs,
        files=request.app[OPEN_FILES],
        key=key,
        start=0,
        length=info.size,
        on_bytes=lambda _n: None,
        stall_seconds=request.app[SETTINGS].stream_stall_seconds,
    )
    return response
