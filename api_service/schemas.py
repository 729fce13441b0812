"""Request shapes of the api service, validated strictly: wrong types are 400s, not 500s."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shared.errors import ValidationError

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,32}$")
# Path words that can never be usernames, so /users/me and friends stay unambiguous.
RESERVED_USERNAMES = frozenset({"me", "admin", "api", "root", "system", "vod"})
PASSWORD_MIN = 8
PASSWORD_MAX = 128
REFRESH_TOKEN_MAX = 256


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValidationError("The body must be a JSON object.")
    return body


def _string_field(body: dict[str, Any], name: str, errors: list[dict[str, str]]) -> str | None:
    value = body.get(name)
    if value is None:
        errors.append({"field": name, "problem": "is required"})
        return None
    if not isinstance(value, str):
        errors.append({"field": name, "problem": "must be a string"})
        return None
    return value


def parse_new_user(body: Any) -> Credentials:
    """``{username, password}`` for sign-up, with the design's rules."""
    data = _object(body)
    errors: list[dict[str, str]] = []
    username = _string_field(data, "username", errors)
    password = _string_field(data, "password", errors)
    if username is not None:
        if not USERNAME_RE.match(username):
            errors.append({"field": "username", "problem": "3-32 characters of A-Z a-z 0-9 _ . -"})
        elif username.lower() in RESERVED_USERNAMES:
            errors.append({"field": "username", "problem": "is reserved"})
    if password is not None and not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        errors.append({"field": "password", "problem": f"{PASSWORD_MIN}-{PASSWORD_MAX} characters"})
    if errors or username is None or password is None:
        raise ValidationError("The account details are not valid.", errors=errors)
    return Credentials(username=username, password=password)


def parse_credentials(body: Any) -> Credentials:
    """``{username, password}`` for sign-in: shape only; wrong values are a plain 401."""
    data = _object(body)
    errors: list[dict[str, str]] = []
    username = _string_field(data, "username", errors)
    password = _string_field(data, "password", errors)
    if errors or username is None or password is None:
        raise ValidationError("Both username and password are required.", errors=errors)
    return Credentials(username=username, password=password)


def parse_refresh_token(body: Any) -> str:
    data = _object(body)
    errors: list[dict[str, str]] = []
    token = _string_field(data, "refresh_token", errors)
    if token is not None and not 0 < len(token) <= REFRESH_TOKEN_MAX:
        errors.append({"field": "refresh_token", "problem": "is not a refresh token"})
    if errors or token is None:
        raise ValidationError("A refresh_token is required.", errors=errors)
    return token
