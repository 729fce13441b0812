"""A message's attempt count comes from a header any publisher can set: it must never crash."""

from __future__ import annotations

import pytest

from shared.bus.port import ATTEMPTS_HEADER, attempts_of


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3),
        ("4", 4),
        (b" 5 ", 5),
        (-2, 0),
        (True, 0),
        ("²", 0),  # a Unicode digit: str.isdigit() says yes, int() says no
        ("٣", 0),  # Arabic-Indic three: int() would accept it, but it is no header of ours
        ("9" * 5000, 0),  # past int()'s digit limit
        ("three", 0),
        (None, 0),
        (1.5, 0),
    ],
)
def test_attempts_header_is_read_strictly(value: object, expected: int) -> None:
    assert attempts_of({ATTEMPTS_HEADER: value}) == expected


def test_a_message_without_the_header_has_no_attempts() -> None:
    assert attempts_of({}) == 0
