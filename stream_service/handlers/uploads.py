"""Uploads: parse, call the upload service once, serialise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from shared.errors import BadRequestError
from shared.web import json_response, read_json, require_identity
from stream_service.keys import UPLOADED_BYTES, UPLOADS
from stream_service.schemas import (
    CHUNK_CHECKSUM_HEADER,
    parse_chunk_checksum,
    parse_chunk_index,
    parse_completion,
    parse_new_upload,
)
from stream_service.services.uploads import UploadView

# Progress changes with every chunk: never cache it.
NO_STORE: Final = {"Cache-Control": "no-store"}


def status_json(view: UploadView) -> dict[str, Any]:
    body: dict[str, Any] = {
        "upload_id": view.id,
        "state": view.state,
        "filename": view.filename,
        "size": view.size,
        "content_hash": view.content_hash,
        "chunk_size": view.chunk_size,
        "total_chunks": view.total_chunks,
        "received": view.received,
        "missing": view.missing,
        "expires_at": view.expires_at,
        "instant": view.instant,
    }
    if view.challenge is not None:
        body["challenge"] = {"offset": view.challenge.offset, "length": view.challenge.length}
    return body


async def create_upload(request: web.Request) -> web.Response:
    identity = require_identity(request)
    new = parse_new_upload(await read_json(request))
    view = await request.app[UPLOADS].create(
        identity.user_id,
        filename=new.filename,
        size=new.size,
        content_hash=new.content_hash,
        chunk_size=new.chunk_size,
    )
    body = {
        "upload_id": view.id,
        "chunk_size": view.chunk_size,
        "total_chunks": view.total_chunks,
        "received": view.received,
        "expires_at": view.expires_at,
    }
    headers = {"Location": f"/api/v1/uploads/{view.id}", **NO_STORE}
    if view.challenge is not None:
        # 200, not 201: the content exists already; this upload only has to prove it.
        body["instant"] = True
        body["challenge"] = {"offset": view.challenge.offset, "length": view.challenge.length}
        return json_response(body, status=200, headers=headers)
    return json_response(body, status=201, headers=headers)


async def get_upload(request: web.Request) -> web.Response:
    identity = require_identity(request)
    view = await request.app[UPLOADS].status(identity.user_id, request.match_info["upload_id"])
    return json_response(status_json(view), headers=NO_STORE)


async def body_pieces(request: web.Request) -> AsyncIterator[bytes]:
    """The request body, each piece as the connection received it.

    Never joined: fixed-size reads (``iter_chunked``) copied every byte once more, and
    ``iter_any`` copies whatever pieces wait when the handler falls behind the socket (it
    joins them into one). ``iter_chunks`` hands out one buffered piece at a time; the
    store gathers them by reference into its write slices. Its empty pieces only mark the
    ends of chunked-transfer chunks.
    """
    async for piece, _ in request.content.iter_chunks():
        if piece:
            yield piece


async def put_chunk(request: web.Request) -> web.Response:
    identity = require_identity(request)
    index = parse_chunk_index(request.match_info["index"])
    checksum = parse_chunk_checksum(request.headers.get(CHUNK_CHECKSUM_HEADER))
    try:
        stored = await request.app[UPLOADS].put_chunk(
            identity.user_id,
            request.match_info["upload_id"],
            index,
            checksum=checksum,
            content_length=request.content_length,
            # Streamed to storage as it arrives: client_max_size never applies to it.
            body=body_pieces(request),
        )
    except (ConnectionResetError, HttpProcessingError) as exc:
        # A dropped connection is what resumable upload is for, not a server error: the
        # chunk was not stored, and the client sends it again once it is back.
        raise BadRequestError(
            "The body ended before the chunk was complete; nothing was stored.",
            code="chunk_incomplete",
        ) from exc
    request.app[UPLOADED_BYTES].inc(stored)
    return web.Response(status=204)


async def complete_upload(request: web.Request) -> web.Response:
    identity = require_identity(request)
    proof = parse_completion(await read_json(request) if request.body_exists else None)
    view = await request.app[UPLOADS].complete(
        identity.user_id, request.match_info["upload_id"], proof=proof
    )
    return json_response(
        {
            "upload_id": view.id,
            "state": view.state,
            "content_hash": view.content_hash,
            "size": view.size,
            "filename": view.filename,
            "instant": view.instant,
            "completed_at": view.completed_at,
        },
        headers=NO_STORE,
    )


async def delete_upload(request: web.Request) -> web.Response:
    identity = require_identity(request)
    await request.app[UPLOADS].delete(identity.user_id, request.match_info["upload_id"])
    return web.Response(status=204)
