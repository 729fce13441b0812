"""RFC 9110 range decisions for a 1000-byte video."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from stream_service.streaming.ranges import Decision, Outcome, decide, strong_etag

SIZE = 1000
ETAG = strong_etag("ab" * 32)
MODIFIED = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)
HTTP_MODIFIED = format_datetime(MODIFIED.replace(microsecond=0), usegmt=True)


def ask(range_header: str | None = None, *, size: int = SIZE, **headers: str) -> Decision:
    return decide(
        method=headers.pop("method", "GET"),
        size=size,
        etag=ETAG,
        last_modified=MODIFIED,
        range_header=range_header,
        if_range=headers.get("if_range"),
        if_none_match=headers.get("if_none_match"),
        if_modified_since=headers.get("if_modified_since"),
    )


@pytest.mark.parametrize(
    ("header", "start", "length"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=100-", 100, 900),
        ("bytes=-100", 900, 100),
        ("bytes=-5000", 0, 1000),  # suffix longer than the file: all of it
        ("bytes=990-5000", 990, 10),  # end past the file: clipped
        ("bytes=999-999", 999, 1),
        ("BYTES = 10 - 19", 10, 10),
        ("bytes=0-99,5000-6000", 0, 100),  # only one satisfiable: that one
    ],
)
def test_single_satisfiable_range_is_partial(header: str, start: int, length: int) -> None:
    decision = ask(header)
    assert decision == Decision(Outcome.PARTIAL, start, length)
    assert decision.end == start + length - 1


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_nothing_satisfiable_is_416(header: str) -> None:
    assert ask(header).outcome is Outcome.UNSATISFIABLE


def test_any_range_of_an_empty_file_is_416() -> None:
    assert ask("bytes=0-", size=0).outcome is Outcome.UNSATISFIABLE
    assert ask(None, size=0) == Decision(Outcome.FULL, 0, 0)


@pytest.mark.parametrize(
    "header",
    ["items=0-10", "bytes=", "bytes=abc", "bytes=10-5", "bytes=-", "bytes 0-10", "bytes=0-1,2-3"],
)
def test_ignored_headers_give_the_whole_file(header: str) -> None:
    assert ask(header) == Decision(Outcome.FULL, 0, SIZE)


def test_if_range_with_the_strong_etag_keeps_the_range() -> None:
    assert ask("bytes=0-9", if_range=ETAG).outcome is Outcome.PARTIAL
    assert ask("bytes=0-9", if_range='"changed"').outcome is Outcome.FULL
    assert ask("bytes=0-9", if_range="W/" + ETAG).outcome is Outcome.FULL


def test_if_range_with_a_date_needs_an_exact_match() -> None:
    assert ask("bytes=0-9", if_range=HTTP_MODIFIED).outcome is Outcome.PARTIAL
    earlier = format_datetime(datetime(2026, 10, 1, tzinfo=UTC), usegmt=True)
    assert ask("bytes=0-9", if_range=earlier).outcome is Outcome.FULL
    assert ask("bytes=0-9", if_range="not a date").outcome is Outcome.FULL


def test_conditional_gets_answer_304() -> None:
    assert ask(if_none_match=ETAG).outcome is Outcome.NOT_MODIFIED
    assert ask(if_none_match=f'"x", {ETAG}').outcome is Outcome.NOT_MODIFIED
    assert ask(if_none_match="*").outcome is Outcome.NOT_MODIFIED
    assert ask(if_none_match='"other"').outcome is Outcome.FULL
    assert ask(if_modified_since=HTTP_MODIFIED).outcome is Outcome.NOT_MODIFIED
    earlier = format_datetime(datetime(2026, 10, 1, tzinfo=UTC), usegmt=True)
    assert ask(if_modified_since=earlier).outcome is Outcome.FULL
    # If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2).
    assert ask(if_none_match='"other"', if_modified_since=HTTP_MODIFIED).outcome is Outcome.FULL


@pytest.mark.parametrize(
    "since",
    [
        "Mon, 01 Jan 2024 00:00:00",  # no zone
        "Mon, 01 Jan 2024 00:00:00 -0000",  # "zone unknown"
        "Sun, 01 Nov 2099 12:00:00",  # after Last-Modified, but still no zone
        "Sun, 01 Nov 2099 12:00:00 -0000",
    ],
)
def test_an_if_modified_since_that_is_no_http_date_is_ignored(since: str) -> None:
    """Not a valid HTTP-date, so ignored (RFC 9110 §13.1.3): the whole file, never a 304,
    and never the TypeError of comparing a date without a zone (a 500)."""
    assert ask(if_modified_since=since) == Decision(Outcome.FULL, 0, SIZE)
    assert ask("bytes=0-9", if_range=since).outcome is Outcome.FULL


def test_an_asctime_date_is_an_http_date_in_utc() -> None:
    """asctime's form names no zone but is UTC by definition (RFC 9110 §5.6.7)."""
    assert ask(if_modified_since="Sun Nov  1 12:00:00 2026").outcome is Outcome.NOT_MODIFIED
    assert ask(if_modified_since="Sun Nov  1 11:59:59 2026").outcome is Outcome.FULL
    assert ask("bytes=0-9", if_range="Sun Nov  1 12:00:00 2026").outcome is Outcome.PARTIAL
