"""tus 1.0.0 over HTTP: parse the tus headers, call the tus service once, answer in tus.

Every response under ``/api/v1/tus`` carries ``Tus-Resumable`` (``stamp_tus_resumable``,
a response signal, so problem documents and unmatched routes carry it too). Errors keep
the status codes and headers tus prescribes and are RFC 9457 documents like any other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Final

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from shared.errors import AppError, BadRequestError
from shared.web import SETTINGS, require_identity
from stream_service.keys import UPLOADED_BYTES
from stream_service.tus.keys import TUS
from stream_service.tus.protocol import (
    CHECKSUM_ALGORITHMS,
    EXTENSIONS,
    TUS_CHECKSUM_ALGORITHM,
    TUS_EXTENSION,
    TUS_MAX_SIZE,
    TUS_RESUMABLE,
    TUS_VERSION,
    TUS_VERSION_HEADER,
    UPLOAD_CHECKSUM,
    UPLOAD_DEFER_LENGTH,
    UPLOAD_EXPIRES,
    UPLOAD_LENGTH,
    UPLOAD_METADATA,
    UPLOAD_OFFSET,
    Checksum,
    check_patch_content_type,
    check_version,
    parse_checksum,
    parse_length,
    parse_metadata,
    parse_offset,
)
from stream_service.tus.service import TusStatus

TUS_PATH: Final = "/api/v1/tus"
# Pieces of a PATCH body handed on as they arrive (at most this much per read).
BODY_READ_BYTES: Final = 1024 * 1024


async def stamp_tus_resumable(request: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` hook: tus wants its version on every response."""
    if request.path == TUS_PATH or request.path.startswith(TUS_PATH + "/"):
        response.headers[TUS_RESUMABLE] = TUS_VERSION


def public_url(request: web.Request, upload_id: str) -> str:
    """The upload's URL: under ``VOD_PUBLIC_URL`` when set, else relative (tus 1.0 lets
    ``Location`` be either; clients resolve it against the URL they posted to).

    Never built from the request's ``Host`` (the gateway passes it on as
    ``X-Forwarded-Host``): any client sets that, and a URL made from it points wherever
    the client said; whoever resumes the upload from it sends the bytes and the Bearer
    token there.
    """
    base = request.app[SETTINGS].public_url or ""
    return f"{base}{TUS_PATH}/{upload_id}"


def _http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def _progress_headers(status: TusStatus) -> dict[str, str]:
    headers = {UPLOAD_OFFSET: str(status.offset), hdrs.CACHE_CONTROL: "no-store"}
    if status.expires_at is not None:
        headers[UPLOAD_EXPIRES] = _http_date(status.expires_at)
    return headers


async def discover_tus(request: web.Request) -> web.Response:
    """OPTIONS: what this server speaks. Open to anyone, like the protocol's discovery."""
    return web.Response(
        status=204,
        headers={
            TUS_VERSION_HEADER: TUS_VERSION,
            TUS_EXTENSION: ",".join(EXTENSIONS),
            TUS_MAX_SIZE: str(request.app[SETTINGS].max_upload_bytes),
            TUS_CHECKSUM_ALGORITHM: ",".join(CHECKSUM_ALGORITHMS),
        },
    )


async def create_tus_upload(request: web.Request) -> web.Response:
    """POST: a new upload (creation), with its first bytes if sent (creation-with-upload)."""
    check_version(request.headers.get(TUS_RESUMABLE))
    identity = require_identity(request)
    length = parse_length(
        request.headers.get(UPLOAD_LENGTH), request.headers.get(UPLOAD_DEFER_LENGTH)
    )
    metadata = parse_metadata(request.headers.get(UPLOAD_METADATA))
    with_bytes = request.body_exists and request.content_length != 0
    checksum = None
    if with_bytes:
        check_patch_content_type(request.content_type)
        checksum = parse_checksum(request.headers.get(UPLOAD_CHECKSUM))
    service = request.app[TUS]
    status = await service.create(identity.user_id, length=length, metadata=metadata)
    location = public_url(request, status.id)
    if with_bytes:
        try:
            status = await _append(request, identity.user_id, status.id, 0, checksum)
        except AppError as error:
            # The upload exists: a client that knows where can resume it.
            error.headers[hdrs.LOCATION] = location
            raise
    return web.Response(status=201, headers={hdrs.LOCATION: location, **_progress_headers(status)})


async def get_tus_offset(request: web.Request) -> web.Response:
    """HEAD: how many bytes the server has, so the client resumes from there."""
    check_version(request.headers.get(TUS_RESUMABLE))
    identity = require_identity(request)
    status = await request.app[TUS].status(identity.user_id, request.match_info["upload_id"])
    headers = {UPLOAD_LENGTH: str(status.length), **_progress_headers(status)}
    if status.metadata:
        headers[UPLOAD_METADATA] = status.metadata
    return web.Response(status=200, headers=headers)


async def patch_tus_upload(request: web.Request) -> web.Response:
    """PATCH: bytes at ``Upload-Offset``."""
    check_version(request.headers.get(TUS_RESUMABLE))
    check_patch_content_type(request.content_type)
    identity = require_identity(request)
    offset = parse_offset(request.headers.get(UPLOAD_OFFSET))
    checksum = parse_checksum(request.headers.get(UPLOAD_CHECKSUM))
    status = await _append(
        request, identity.user_id, request.match_info["upload_id"], offset, checksum
    )
    return web.Response(status=204, headers=_progress_headers(status))


async def delete_tus_upload(request: web.Request) -> web.Response:
    """DELETE (termination): the upload and every byte of it are dropped."""
    check_version(request.headers.get(TUS_RESUMABLE))
    identity = require_identity(request)
    await request.app[TUS].terminate(identity.user_id, request.match_info["upload_id"])
    return web.Response(status=204)


async def _append(
    request: web.Request,
    owner_id: str,
    upload_id: str,
    offset: int,
    checksum: Checksum | None,
) -> TusStatus:
    try:
        status = await request.app[TUS].append(
            owner_id,
            upload_id,
            offset=offset,
            content_length=request.content_length,
            checksum=checksum,
            # Streamed to storage as it arrives: client_max_size never applies to it.
            body=request.content.iter_chunked(BODY_READ_BYTES),
        )
    except HttpProcessingError as exc:
        raise BadRequestError(
            "The body was malformed or ended early; nothing was stored from it.",
            code="body_incomplete",
        ) from exc
    request.app[UPLOADED_BYTES].inc(max(0, status.offset - offset))
    return status
