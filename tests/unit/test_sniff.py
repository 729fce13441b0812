"""Content-Type comes from the file's bytes."""

from __future__ import annotations

import pytest

from stream_service.streaming.sniff import OCTET_STREAM, sniff_media_type


@pytest.mark.parametrize(
    ("head", "media_type"),
    [
        (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00", "video/mp4"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00", "video/quicktime"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "video/webm"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x88matroska", "video/x-matroska"),
        (b"OggS\x00\x02", "video/ogg"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "video/x-msvideo"),
        (b"ID3\x04\x00", "audio/mpeg"),
        (bytes([0x47]) + bytes(187) + bytes([0x47]) + bytes(10), "video/mp2t"),
        (b"<html>not a video</html>", OCTET_STREAM),
        (b"", OCTET_STREAM),
    ],
)
def test_sniffs_common_containers(head: bytes, media_type: str) -> None:
    assert sniff_media_type(head) == media_type
