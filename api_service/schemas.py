"""Request shapes of the api service, validated strictly: wrong types are 400s, not 500s."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import ValidationError
from shared.layout import MAX_DANMAKU_OFFSET_MS

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,32}$")
# Path words that can never be usernames, so /users/me and friends stay unambiguous.
RESERVED_USERNAMES = frozenset({"me", "admin", "api", "root", "system", "vod"})
PASSWORD_MIN = 8
PASSWORD_MAX = 128
REFRESH_TOKEN_MAX = 256


def is_username(name: str) -> bool:
    """True for a name sign-up would accept (reserved words aside). Whole-string match:
    ``$`` alone would let a trailing newline through."""
    return USERNAME_RE.fullmatch(name) is not None


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
        if not is_username(username):
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


def parse_cookie_mode(body: Any) -> bool:
    """The optional ``cookie`` flag of a sign-in: true asks for the refresh token in an
    HttpOnly cookie (the web page) instead of the body (API clients)."""
    value = _object(body).get("cookie", False)
    if not isinstance(value, bool):
        raise ValidationError(
            "cookie must be true or false.",
            errors=[{"field": "cookie", "problem": "must be a boolean"}],
        )
    return value


def parse_refresh_token(body: Any) -> str:
    data = _object(body)
    errors: list[dict[str, str]] = []
    token = _string_field(data, "refresh_token", errors)
    if token is not None and not 0 < len(token) <= REFRESH_TOKEN_MAX:
        errors.append({"field": "refresh_token", "problem": "is not a refresh token"})
    if errors or token is None:
        raise ValidationError("A refresh_token is required.", errors=errors)
    return token


TITLE_MAX = 200
DESCRIPTION_MAX = 5000
QUERY_MAX = 100
LIMIT_DEFAULT = 20
LIMIT_MAX = 100


@dataclass(frozen=True, slots=True)
class NewVideo:
    title: str
    description: str
    upload_id: str


@dataclass(frozen=True, slots=True)
class ListParams:
    limit: int
    cursor: str | None
    author: str | None
    query: str | None


def _text_field(
    data: dict[str, Any],
    name: str,
    errors: list[dict[str, str]],
    *,
    maximum: int,
    minimum: int = 0,
) -> str | None:
    value = data.get(name)
    if not isinstance(value, str):
        errors.append({"field": name, "problem": "must be a string"})
        return None
    value = value.strip()
    if not minimum <= len(value) <= maximum:
        errors.append({"field": name, "problem": f"{minimum}-{maximum} characters"})
        return None
    return value


def _no_unknown_fields(
    data: dict[str, Any], allowed: frozenset[str], errors: list[dict[str, str]]
) -> None:
    errors.extend(
        {"field": name, "problem": "is not a known field"} for name in data.keys() - allowed
    )


def parse_new_video(body: Any) -> NewVideo:
    data = _object(body)
    errors: list[dict[str, str]] = []
    _no_unknown_fields(data, frozenset({"title", "description", "upload_id"}), errors)
    title = _text_field(data, "title", errors, minimum=1, maximum=TITLE_MAX)
    description = (
        _text_field(data, "description", errors, maximum=DESCRIPTION_MAX)
        if data.get("description") is not None
        else ""
    )
    upload_id = _string_field(data, "upload_id", errors)
    if errors or title is None or description is None or upload_id is None:
        raise ValidationError("The video details are not valid.", errors=errors)
    return NewVideo(title=title, description=description, upload_id=upload_id)


def parse_video_changes(body: Any) -> dict[str, str]:
    data = _object(body)
    errors: list[dict[str, str]] = []
    _no_unknown_fields(data, frozenset({"title", "description"}), errors)
    changes: dict[str, str] = {}
    if "title" in data:
        title = _text_field(data, "title", errors, minimum=1, maximum=TITLE_MAX)
        if title is not None:
            changes["title"] = title
    if "description" in data:
        description = _text_field(data, "description", errors, maximum=DESCRIPTION_MAX)
        if description is not None:
            changes["description"] = description
    if not changes and not errors:
        errors.append({"field": "title", "problem": "send title, description or both"})
    if errors:
        raise ValidationError("The changes are not valid.", errors=errors)
    return changes


def _small_whole_number(raw: str) -> bool:
    """ASCII digits only, and few enough for int(): str.isdigit() also accepts "²" and
    other Unicode digits int() refuses, and int() refuses more than 4,300 digits."""
    return raw.isascii() and raw.isdigit() and len(raw) <= 18  # noqa: PLR2004


def parse_list_params(query: Mapping[str, str], *, allow_author: bool = True) -> ListParams:
    errors: list[dict[str, str]] = []
    raw_limit = query.get("limit", str(LIMIT_DEFAULT))
    limit = LIMIT_DEFAULT
    if not _small_whole_number(raw_limit) or not 1 <= int(raw_limit) <= LIMIT_MAX:
        errors.append({"field": "limit", "problem": f"a whole number 1-{LIMIT_MAX}"})
    else:
        limit = int(raw_limit)
    cursor = query.get("cursor") or None
    author = query.get("author") or None if allow_author else None
    if author is not None and not is_username(author):
        errors.append({"field": "author", "problem": "is not a username"})
    q = (query.get("q") or "").strip() or None
    if q is not None and len(q) > QUERY_MAX:
        errors.append({"field": "q", "problem": f"at most {QUERY_MAX} characters"})
    if errors:
        raise ValidationError("The list parameters are not valid.", errors=errors)
    return ListParams(limit=limit, cursor=cursor, author=author, query=q)


COMMENT_MAX = 2000
DANMAKU_MAX = 100
DANMAKU_MODES = frozenset({"scroll", "top", "bottom"})
_COLOR_RE = re.compile(r"^#[0-9a-fA-F]{6}$")
# The longest offset accepted while a video's duration is unknown (not probed yet): 24 h.
MAX_OFFSET_MS = MAX_DANMAKU_OFFSET_MS
# One window read covers at most an hour of the video (ten 6-minute buckets).
MAX_WINDOW_MS = 60 * 60 * 1000
DEFAULT_WINDOW_MS = 6 * 60 * 1000


@dataclass(frozen=True, slots=True)
class NewDanmaku:
    offset_ms: int
    content: str
    mode: str
    color: str


@dataclass(frozen=True, slots=True)
class DanmakuWindow:
    from_ms: int
    to_ms: int


def parse_new_comment(body: Any) -> str:
    """``{content}``: 1-2000 characters once surrounding white space is trimmed."""
    data = _object(body)
    errors: list[dict[str, str]] = []
    _no_unknown_fields(data, frozenset({"content"}), errors)
    content = _text_field(data, "content", errors, minimum=1, maximum=COMMENT_MAX)
    if errors or content is None:
        raise ValidationError("The comment is not valid.", errors=errors)
    return content


def parse_new_danmaku(body: Any, *, allowed: frozenset[str] | None = None) -> NewDanmaku:
    """``{offset_ms, content, mode, color}``; ``allowed`` widens the known fields (the live
    channel's messages also carry ``type``)."""
    data = _object(body)
    errors: list[dict[str, str]] = []
    known = frozenset({"offset_ms", "content", "mode", "color"}) | (allowed or frozenset())
    _no_unknown_fields(data, known, errors)
    offset = data.get("offset_ms")
    if isinstance(offset, bool) or not isinstance(offset, int):
        errors.append({"field": "offset_ms", "problem": "must be a whole number"})
    elif not 0 <= offset <= MAX_OFFSET_MS:
        errors.append({"field": "offset_ms", "problem": f"0-{MAX_OFFSET_MS}"})
    content = _text_field(data, "content", errors, minimum=1, maximum=DANMAKU_MAX)
    mode = data.get("mode")
    if not isinstance(mode, str) or mode not in DANMAKU_MODES:
        errors.append({"field": "mode", "problem": "scroll, top or bottom"})
    color = data.get("color")
    if not isinstance(color, str) or not _COLOR_RE.match(color):
        errors.append({"field": "color", "problem": "#rrggbb"})
    if (
        errors
        or content is None
        or not isinstance(offset, int)
        or not isinstance(mode, str)
        or not isinstance(color, str)
    ):
        raise ValidationError("The danmaku is not valid.", errors=errors)
    return NewDanmaku(offset_ms=offset, content=content, mode=mode, color=color.lower())


def _milliseconds(query: Mapping[str, str], name: str, errors: list[dict[str, str]]) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    if not _small_whole_number(raw) or int(raw) > MAX_OFFSET_MS:
        errors.append({"field": name, "problem": f"a whole number 0-{MAX_OFFSET_MS}"})
        return None
    return int(raw)


def parse_danmaku_window(query: Mapping[str, str]) -> DanmakuWindow:
    """``from_ms`` (default 0) to ``to_ms`` (default 6 minutes later), inclusive; at most
    an hour."""
    errors: list[dict[str, str]] = []
    start = _milliseconds(query, "from_ms", errors)
    end = _milliseconds(query, "to_ms", errors)
    if errors:
        raise ValidationError("The window is not valid.", errors=errors)
    start = start or 0
    end = start + DEFAULT_WINDOW_MS - 1 if end is None else end
    if end < start:
        errors.append({"field": "to_ms", "problem": "must not be before from_ms"})
    elif end - start >= MAX_WINDOW_MS:
        errors.append({"field": "to_ms", "problem": f"a window spans at most {MAX_WINDOW_MS} ms"})
    if errors:
        raise ValidationError("The window is not valid.", errors=errors)
    return DanmakuWindow(from_ms=start, to_ms=end)
