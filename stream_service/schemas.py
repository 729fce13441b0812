"""Request shapes of the stream service, validated strictly: anything a client can send
that is not what the contract says is a 400 problem, never a 500."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from shared.content_hash import BLOCK_SIZE
from shared.errors import ValidationError
from stream_service.services.uploads import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

CHUNK_CHECKSUM_HEADER: Final = "X-Chunk-SHA256"
FILENAME_MAX: Final = 255
# Up to a million chunks (chunk_key pads to six digits): far beyond any allowed size.
_INDEX_RE: Final = re.compile(r"^[0-9]{1,6}$")
_HEX_RE: Final = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class NewUpload:
    filename: str
    size: int
    content_hash: str
    chunk_size: int


def _is_int(value: Any) -> TypeGuard[int]:
    # JSON true/false arrive as bool, which Python counts as int.
    return isinstance(value, int) and not isinstance(value, bool)


def _sha256_hex(value: Any) -> str | None:
    """A SHA-256 in hex, lower-cased (clients may send upper case); None if it is not one."""
    if isinstance(value, str) and _HEX_RE.match(value):
        return value.lower()
    return None


def filename_problem(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if len(value) > FILENAME_MAX:
        return f"at most {FILENAME_MAX} characters"
    if "/" in value or "\\" in value:
        return "a file name, not a path"
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in value):
        return "must not contain control characters"
    return None


def parse_new_upload(body: Any) -> NewUpload:
    """``{filename, size, content_hash, chunk_size?}``; unknown fields are ignored."""
    if not isinstance(body, dict):
        raise ValidationError("The body must be a JSON object.")
    errors: list[dict[str, str]] = []

    filename: str | None = None
    raw_filename = body.get("filename")
    if not isinstance(raw_filename, str):
        errors.append({"field": "filename", "problem": "is required, as a string"})
    elif (problem := filename_problem(raw_filename)) is not None:
        errors.append({"field": "filename", "problem": problem})
    else:
        filename = raw_filename

    size: int | None = None
    raw_size = body.get("size")
    if not _is_int(raw_size):
        errors.append({"field": "size", "problem": "is required, as an integer"})
    elif raw_size < 1:
        errors.append({"field": "size", "problem": "at least 1 byte: an empty file is no video"})
    else:
        size = raw_size

    content_hash = _sha256_hex(body.get("content_hash"))
    if content_hash is None:
        errors.append({"field": "content_hash", "problem": "is required, as 64 hex digits"})

    chunk_size: int | None = None
    raw_chunk_size = body.get("chunk_size", DEFAULT_CHUNK_SIZE)
    if _is_int(raw_chunk_size) and (
        MIN_CHUNK_SIZE <= raw_chunk_size <= MAX_CHUNK_SIZE and raw_chunk_size % BLOCK_SIZE == 0
    ):
        chunk_size = raw_chunk_size
    else:
        errors.append(
            {
                "field": "chunk_size",
                "problem": f"a multiple of {BLOCK_SIZE} from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}",
            }
        )

    if errors or filename is None or size is None or content_hash is None or chunk_size is None:
        raise ValidationError("The upload is not valid.", errors=errors)
    return NewUpload(filename=filename, size=size, content_hash=content_hash, chunk_size=chunk_size)


def parse_chunk_index(text: str) -> int:
    if not _INDEX_RE.match(text):
        raise ValidationError(
            "The chunk index is a whole number from 0.",
            errors=[{"field": "index", "problem": "not a chunk index"}],
        )
    return int(text)


def parse_chunk_checksum(value: str | None) -> str:
    checksum = _sha256_hex(value)
    if checksum is None:
        problem = "is required" if value is None else "must be 64 hex digits"
        raise ValidationError(
            f"Send the chunk's SHA-256 in {CHUNK_CHECKSUM_HEADER}.",
            errors=[{"field": CHUNK_CHECKSUM_HEADER, "problem": problem}],
        )
    return checksum


def parse_completion(body: Any) -> str | None:
    """``{}`` or ``{"proof": hex}``: the proof of an instant upload, if any."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise ValidationError("The body must be a JSON object.")
    proof = body.get("proof")
    if proof is None:
        return None
    checksum = _sha256_hex(proof)
    if checksum is None:
        raise ValidationError(
            "The proof is the SHA-256 of the challenged bytes, as 64 hex digits.",
            errors=[{"field": "proof", "problem": "must be 64 hex digits"}],
        )
    return checksum
