"""The one message shape on the bus, and its JSON wire format."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

# AMQP caps routing keys (and so event types) at 255 bytes.
MAX_TYPE_BYTES = 255
_WIRE_KEYS = ("id", "type", "occurred_at", "data")


class MalformedEventError(ValueError):
    """A message body is not a valid event; consumers park it instead of handling it."""


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened, told to whoever listens.

    ``type`` is also the routing key (``video.deleted``), so it is a dotted name without
    the topic wildcards. ``id`` is what consumers deduplicate on: the bus delivers at
    least once.
    """

    id: str
    type: str
    occurred_at: datetime
    data: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("event id must be a non-empty string")
        _check_type(self.type)
        if not isinstance(self.occurred_at, datetime) or self.occurred_at.utcoffset() is None:
            raise ValueError("occurred_at must be a timezone-aware datetime")
        if not isinstance(self.data, dict):
            raise TypeError("event data must be a JSON object")
        # One canonical zone, so that two events that happened at the same instant
        # compare and serialise the same.
        object.__setattr__(self, "occurred_at", self.occurred_at.astimezone(UTC))

    @classmethod
    def new(cls, type: str, data: Mapping[str, Any] | None = None) -> Event:
        """A fresh event of ``type`` that happens now, with a random (v4) id."""
        return cls(
            id=str(uuid.uuid4()),
            type=type,
            occurred_at=datetime.now(UTC),
            data=dict(data or {}),
        )

    def to_json(self) -> bytes:
        """``{"id", "type", "occurred_at", "data"}`` with the time in RFC 3339 UTC (``Z``)."""
        return orjson.dumps(
            {
                "id": self.id,
                "type": self.type,
                "occurred_at": self.occurred_at,
                "data": self.data,
            },
            option=orjson.OPT_UTC_Z,
        )

    @classmethod
    def from_json(cls, raw: bytes | bytearray | memoryview | str) -> Event:
        """Parse a wire body; raises ``MalformedEventError`` for anything that is not one.

        Unknown top-level keys are ignored, so that a producer may add one before every
        consumer knows it.
        """
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise MalformedEventError(f"not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise MalformedEventError("not a JSON object")
        missing = [key for key in _WIRE_KEYS if key not in document]
        if missing:
            raise MalformedEventError(f"missing {', '.join(missing)}")
        occurred_at = document["occurred_at"]
        if not isinstance(occurred_at, str):
            raise MalformedEventError("occurred_at is not an RFC 3339 string")
        try:
            return cls(
                id=document["id"],
                type=document["type"],
                occurred_at=datetime.fromisoformat(occurred_at),
                data=document["data"],
            )
        except (TypeError, ValueError) as exc:
            raise MalformedEventError(str(exc)) from None


def _check_type(type_: object) -> None:
    if not isinstance(type_, str) or not type_:
        raise ValueError("event type must be a non-empty string")
    if len(type_.encode()) > MAX_TYPE_BYTES:
        raise ValueError(f"event type is longer than {MAX_TYPE_BYTES} bytes")
    if any(word in ("*", "#") or not word for word in type_.split(".")):
        raise ValueError(f"event type {type_!r} must be dotted words without * or #")
