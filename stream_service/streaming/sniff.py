"""The media type of a stored file, from its first bytes (never from the client's name)."""

from __future__ import annotations

from collections.abc import Callable

SNIFF_BYTES = 256
OCTET_STREAM = "application/octet-stream"
_MPEG_TS_PACKET = 188
_MPEG_TS_SYNC = 0x47


def _iso_bmff(head: bytes) -> str | None:
    """MP4, MOV and friends: a ``ftyp`` box first, its major brand says which."""
    if head[4:8] != b"ftyp":
        return None
    brand = head[8:12]
    if brand == b"qt  ":
        return "video/quicktime"
    if brand in (b"M4A ", b"M4B "):
        return "audio/mp4"
    return "video/mp4"


def _ebml(head: bytes) -> str | None:
    if not head.startswith(b"\x1a\x45\xdf\xa3"):
        return None
    return "video/webm" if b"webm" in head else "video/x-matroska"


def _riff(head: bytes) -> str | None:
    if not head.startswith(b"RIFF"):
        return None
    return {b"AVI ": "video/x-msvideo", b"WAVE": "audio/wav"}.get(head[8:12])


def _mpeg_ts(head: bytes) -> str | None:
    if len(head) > _MPEG_TS_PACKET and head[0] == head[_MPEG_TS_PACKET] == _MPEG_TS_SYNC:
        return "video/mp2t"
    return None


def _prefixed(prefixes: tuple[bytes, ...], media_type: str) -> Callable[[bytes], str | None]:
    return lambda head: media_type if head.startswith(prefixes) else None


_SNIFFERS: tuple[Callable[[bytes], str | None], ...] = (
    _iso_bmff,
    _ebml,
    _riff,
    _prefixed((b"OggS",), "video/ogg"),
    _prefixed((b"FLV",), "video/x-flv"),
    _prefixed((b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"), "audio/mpeg"),
    _prefixed((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"), "video/mpeg"),
    _mpeg_ts,
)


def sniff_media_type(head: bytes) -> str:
    """A ``Content-Type`` for a file whose first ``SNIFF_BYTES`` are ``head``."""
    for sniffer in _SNIFFERS:
        media_type = sniffer(head)
        if media_type is not None:
            return media_type
    return OCTET_STREAM
