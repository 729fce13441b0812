"""RFC 9110 byte ranges and validators for one representation, without any I/O.

What a request asks for is decided here, once, so the handler only has to send bytes:

- no ``Range`` (or one we must ignore) → the whole file, 200;
- one satisfiable range → 206 with ``Content-Range``; an end past the file is clipped;
- ranges none of which can be satisfied → 416 with ``Content-Range: bytes */size``;
- several ranges → the whole file, 200. RFC 9110 lets a server ignore ``Range``; players
  ask for one range at a time, and ignoring many-range requests removes the classic
  amplification attack of overlapping ranges;
- ``If-Range`` that does not match the strong ETag (or, for a date, Last-Modified
  exactly) → the whole file, 200, so a client never stitches bytes of two versions;
- ``If-None-Match`` / ``If-Modified-Since`` matching → 304.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum

# ASCII digits, at most 19 (every offset fits in 64 bits): \d would take any Unicode
# digit, and int() refuses strings of over 4,300 digits, which would be a 500.
_RANGE_SPEC = re.compile(r"^\s*([0-9]{0,19})\s*-\s*([0-9]{0,19})\s*$")
# A strong entity tag as vod makes them: the quoted content hash.
_ETAG_LIST_ITEM = re.compile(r'\s*(W/)?("[^"]*"|\*)\s*(?:,|$)')
# asctime's form of an HTTP-date ("Sun Nov  6 08:49:37 1994"), the one that names no zone.
_ASCTIME_DATE = re.compile(r"^\s*[A-Za-z]{3} [A-Za-z]{3} [ 0-9][0-9] [0-9:]{8} [0-9]{4}\s*$")


class Outcome(Enum):
    FULL = 200
    PARTIAL = 206
    NOT_MODIFIED = 304
    UNSATISFIABLE = 416


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    start: int = 0
    length: int = 0  # bytes of body to send

    @property
    def end(self) -> int:
        """Inclusive last byte, as ``Content-Range`` writes it."""
        return self.start + self.length - 1


def strong_etag(content_hash: str) -> str:
    return f'"{content_hash}"'


def _parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """Satisfiable (start, end-inclusive) ranges; None when the header must be ignored."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec:
        return None  # an unknown unit is ignored (RFC 9110 §14.2)
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        match = _RANGE_SPEC.match(part)
        if match is None:
            return None
        first, last = match.groups()
        if first:
            start = int(first)
            end = int(last) if last else size - 1
            if last and end < start:
                return None  # syntactically invalid: ignore the whole header
            if start >= size:
                continue  # unsatisfiable; others may still be
            ranges.append((start, min(end, size - 1)))
        elif last:
            suffix = int(last)
            if suffix == 0 or size == 0:
                continue
            ranges.append((max(size - suffix, 0), size - 1))
        else:
            return None  # "-" alone
    return ranges


def _etag_matches(header: str, etag: str, *, weak: bool) -> bool:
    for weak_prefix, tag in _ETAG_LIST_ITEM.findall(header):
        if tag == "*" or (tag == etag and (weak or not weak_prefix)):
            return True
    return False


def _http_date(value: str) -> datetime | None:
    """An HTTP-date, always in UTC; None for anything else, which the caller ignores
    (RFC 9110 §13.1.3: an If-Modified-Since that is not a valid HTTP-date is ignored).

    The email parser also takes dates without a zone, or with "-0000" (zone unknown), and
    gives them no time zone: comparing one with an aware datetime raised a TypeError, a 500
    for any anonymous client. Of those only asctime's form is an HTTP-date, in UTC by
    definition (RFC 9110 §5.6.7); the others are not dates a recipient may trust.
    """
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is not None:
        return parsed
    return parsed.replace(tzinfo=UTC) if _ASCTIME_DATE.match(value) else None


def decide(
    *,
    method: str,
    size: int,
    etag: str,
    last_modified: datetime,
    range_header: str | None,
    if_range: str | None,
    if_none_match: str | None,
    if_modified_since: str | None,
) -> Decision:
    """What to answer for a GET or HEAD of a ``size``-byte representation."""
    if _not_modified(etag, last_modified, if_none_match, if_modified_since):
        return Decision(Outcome.NOT_MODIFIED)
    full = Decision(Outcome.FULL, 0, size)
    if range_header is None or method not in ("GET", "HEAD"):
        return full
    if if_range is not None and not _if_range_holds(if_range, etag, last_modified):
        return full
    ranges = _parse_ranges(range_header, size)
    if ranges == []:
        return Decision(Outcome.UNSATISFIABLE)
    if ranges is None or len(ranges) > 1:
        return full
    start, end = ranges[0]
    return Decision(Outcome.PARTIAL, start, end - start + 1)


def _not_modified(
    etag: str, last_modified: datetime, if_none_match: str | None, if_modified_since: str | None
) -> bool:
    if if_none_match is not None:
        # When both are sent, If-None-Match alone decides (RFC 9110 §13.2.2).
        return _etag_matches(if_none_match, etag, weak=True)
    if if_modified_since is not None:
        since = _http_date(if_modified_since)
        return since is not None and last_modified.replace(microsecond=0) <= since
    return False


def _if_range_holds(if_range: str, etag: str, last_modified: datetime) -> bool:
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        # Only a strong match counts (RFC 9110 §13.1.5): a weak tag never does.
        return value == etag
    date = _http_date(value)
    return date is not None and date == last_modified.replace(microsecond=0)
