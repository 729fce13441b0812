"""Opaque list cursors: the last id of a page, versioned and base64url-encoded.

Every list of the api is keyset-paginated on a time-sortable id (``shared.db.new_id``),
newest or oldest first; the cursor is that id, wrapped so clients treat it as opaque.
"""

from __future__ import annotations

import base64
import binascii

from shared.errors import BadRequestError

CURSOR_VERSION = "v1:"


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode((CURSOR_VERSION + last_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The id inside ``cursor``; a 400 ``invalid_cursor`` for anything this API did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    if not raw.startswith(CURSOR_VERSION) or not raw[len(CURSOR_VERSION) :].isalnum():
        raise BadRequestError("The cursor is not one this API gave out.", code="invalid_cursor")
    return raw[len(CURSOR_VERSION) :]
