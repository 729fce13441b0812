"""tus 1.0.0 on the wire: its constants, its headers parsed strictly, and its errors.

Everything a client can put in a tus header is checked here, so a malformed one is a 400
problem document with a stable code, never a 500. The status codes tus prescribes (412,
415, 409, 460, 410) are kept; the body is vod's usual RFC 9457 document.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Final

from shared.errors import AppError, BadRequestError, UnsupportedMediaTypeError, ValidationError
from stream_service.schemas import filename_problem

TUS_VERSION: Final = "1.0.0"
# What OPTIONS announces. Not offered: creation-defer-length (the size is needed up front
# for the quota and the size limit) and concatenation (parallel upload is the native API's).
EXTENSIONS: Final = ("creation", "creation-with-upload", "expiration", "checksum", "termination")
CHECKSUM_ALGORITHMS: Final = ("sha1", "sha256")
PATCH_CONTENT_TYPE: Final = "application/offset+octet-stream"

TUS_RESUMABLE: Final = "Tus-Resumable"
TUS_VERSION_HEADER: Final = "Tus-Version"
TUS_EXTENSION: Final = "Tus-Extension"
TUS_MAX_SIZE: Final = "Tus-Max-Size"
TUS_CHECKSUM_ALGORITHM: Final = "Tus-Checksum-Algorithm"
UPLOAD_OFFSET: Final = "Upload-Offset"
UPLOAD_LENGTH: Final = "Upload-Length"
UPLOAD_METADATA: Final = "Upload-Metadata"
UPLOAD_EXPIRES: Final = "Upload-Expires"
UPLOAD_CHECKSUM: Final = "Upload-Checksum"
UPLOAD_DEFER_LENGTH: Final = "Upload-Defer-Length"

# The file name a client that sends none gets (tus makes metadata optional).
DEFAULT_FILENAME: Final = "upload"
# Metadata keys stock clients use for the name and the media type (tus-js-client and Uppy
# send both spellings).
FILENAME_KEYS: Final = ("filename", "name")
FILETYPE_KEYS: Final = ("filetype", "type")
FILETYPE_MAX: Final = 255

_DIGITS_RE: Final = re.compile(r"^[0-9]{1,19}$")
_METADATA_KEY_RE: Final = re.compile(r"^[^\s,]+$")


class TusVersionError(AppError):
    status = 412
    code = "tus_version_unsupported"
    title = "Precondition Failed"


class UploadExpiredError(AppError):
    status = 410
    code = "upload_expired"
    title = "Gone"


class ChecksumMismatchError(AppError):
    # tus's checksum extension: "460 Checksum Mismatch".
    status = 460
    code = "checksum_mismatch"
    title = "Checksum Mismatch"


@dataclass(frozen=True, slots=True)
class Checksum:
    """An ``Upload-Checksum``: the algorithm and the digest the body must have."""

    algorithm: str
    digest: bytes

    def new_hash(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


@dataclass(frozen=True, slots=True)
class Metadata:
    """``Upload-Metadata`` as sent (echoed on HEAD) and what vod reads from it."""

    raw: str
    filename: str
    filetype: str | None


def check_version(value: str | None) -> None:
    """412 unless the request speaks tus 1.0.0 (every request but OPTIONS must say so)."""
    if value != TUS_VERSION:
        raise TusVersionError(
            f"This server speaks tus {TUS_VERSION}; send 'Tus-Resumable: {TUS_VERSION}'.",
            headers={TUS_VERSION_HEADER: TUS_VERSION},
        )


def check_patch_content_type(content_type: str) -> None:
    if content_type != PATCH_CONTENT_TYPE:
        raise UnsupportedMediaTypeError(
            f"Send the bytes as {PATCH_CONTENT_TYPE}.", code="unsupported_media_type"
        )


def _non_negative(name: str, value: str | None) -> int:
    if value is None:
        raise BadRequestError(f"The {name} header is required.", code=f"{_code(name)}_required")
    if not _DIGITS_RE.match(value.strip()):
        raise BadRequestError(
            f"{name} must be a non-negative integer.", code=f"invalid_{_code(name)}"
        )
    return int(value)


def _code(header: str) -> str:
    return header.lower().replace("-", "_")


def parse_offset(value: str | None) -> int:
    return _non_negative(UPLOAD_OFFSET, value)


def parse_length(value: str | None, defer: str | None) -> int:
    """The announced size: required (no deferred length), at least one byte."""
    if value is None and defer is not None:
        raise BadRequestError(
            "Deferred lengths are not supported: send Upload-Length.",
            code="upload_defer_length_unsupported",
        )
    length = _non_negative(UPLOAD_LENGTH, value)
    if length == 0:
        raise ValidationError(
            "Upload-Length is not valid.",
            errors=[
                {"field": UPLOAD_LENGTH, "problem": "at least 1 byte: an empty file is no video"}
            ],
        )
    return length


def parse_checksum(value: str | None) -> Checksum | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``; None when absent."""
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise BadRequestError(
            f"Upload-Checksum algorithms are {', '.join(CHECKSUM_ALGORITHMS)}.",
            code="checksum_algorithm_unsupported",
            headers={TUS_CHECKSUM_ALGORITHM: ",".join(CHECKSUM_ALGORITHMS)},
        )
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:  # binascii.Error, or a character past ASCII (was a 500)
        digest = b""
    if len(digest) != hashlib.new(algorithm).digest_size:
        raise BadRequestError(
            f"Upload-Checksum must be '{algorithm} ' and the base64 of the digest.",
            code="invalid_upload_checksum",
        )
    return Checksum(algorithm, digest)


def parse_metadata(value: str | None) -> Metadata:
    """``Upload-Metadata``: comma-separated ``key`` or ``key base64(value)`` pairs."""
    if value is None or not value.strip():
        return Metadata("", DEFAULT_FILENAME, None)
    pairs: dict[str, str | None] = {}
    for item in value.split(","):
        key, _, encoded = item.strip().partition(" ")
        if not _METADATA_KEY_RE.match(key) or key in pairs:
            raise _bad_metadata(f"the key {key!r} is empty, repeated or has a space or comma")
        try:
            pairs[key] = (
                base64.b64decode(encoded.strip(), validate=True).decode() if encoded else None
            )
        except ValueError:  # binascii.Error, UnicodeDecodeError, or a character past ASCII
            raise _bad_metadata(f"the value of {key!r} is not base64 of UTF-8 text") from None
    filename = next((pairs[k] for k in FILENAME_KEYS if pairs.get(k)), None) or DEFAULT_FILENAME
    if (problem := filename_problem(filename)) is not None:
        raise ValidationError(
            "Upload-Metadata is not valid.",
            errors=[{"field": "Upload-Metadata filename", "problem": problem}],
        )
    filetype = next((pairs[k] for k in FILETYPE_KEYS if pairs.get(k)), None)
    if filetype is not None and len(filetype) > FILETYPE_MAX:
        raise _bad_metadata(f"the filetype is longer than {FILETYPE_MAX} characters")
    return Metadata(value.strip(), filename, filetype)


def _bad_metadata(problem: str) -> BadRequestError:
    return BadRequestError(
        f"Upload-Metadata is malformed: {problem}.", code="invalid_upload_metadata"
    )
