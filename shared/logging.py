"""Logs carrying the request id of the work in hand: one JSON object per line for machines,
one short line per event for a person at a terminal (``make run``).

``VOD_LOG_FORMAT`` chooses: ``json``, ``text``, or ``auto`` (the default): text when the
stream the logs go to (stderr) is a terminal, JSON otherwise (a file, a pipe, a container's
log collector).
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson

# Set by the request-id middleware for HTTP work and by consumers from AMQP headers.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

LOG_FORMATS: Final = ("auto", "json", "text")

# Attributes every LogRecord has; anything else a caller passed in `extra=` is logged.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
# The extras of a request line (shared.web): in text, its message says them already.
_REQUEST_LINE_ATTRS = frozenset({"route", "status", "ms", "service"})
# Request ids made here are 32 hex digits, a per-process random half then a counter: the
# last 8 tell this process's requests apart, and grep finds them in the full id. A short
# id a client sent (up to 16 characters) is shown whole.
_SHORT_ID_CHARS = 8
_WHOLE_ID_CHARS = 16


# Control characters (C0, DEL, C1) as \xNN in text lines: a request path is the client's
# text, decoded (``%0A``, ``%1B``), and raw it could forge a log line or send escape
# sequences to the terminal reading the log. JSON escapes them already.
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, request id, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": getattr(record, "service", self.service),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in _extras(record).items():
            if key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """Formats a record as one short line for a person: local time, service, (level when
    not INFO), message, extras, short request id. A request line reads
    ``12:03:04 gateway GET /api/v1/videos 200 3ms rid=0000ab12``."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            time.strftime("%H:%M:%S", time.localtime(record.created)),
            str(getattr(record, "service", self.service)),
        ]
        if record.levelno != logging.INFO:
            parts.append(record.levelname)
        parts.append(record.getMessage())
        extras = _extras(record)
        if "status" in extras and "ms" in extras:
            parts.append(f"{extras['ms']:.0f}ms")
            extras = {k: v for k, v in extras.items() if k not in _REQUEST_LINE_ATTRS}
        else:
            extras.pop("service", None)
        parts.extend(f"{key}={value}" for key, value in extras.items())
        request_id = request_id_var.get()
        if request_id is not None:
            short = (
                request_id if len(request_id) <= _WHOLE_ID_CHARS else request_id[-_SHORT_ID_CHARS:]
            )
            parts.append(f"rid={short}")
        line = " ".join(parts).translate(_CONTROL_ESCAPES)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def choose_formatter(service: str, log_format: str, stream: TextIO) -> logging.Formatter:
    """The formatter for ``log_format`` (one of ``LOG_FORMATS``) writing to ``stream``."""
    if log_format == "text" or (log_format == "auto" and stream.isatty()):
        return TextFormatter(service)
    return JsonFormatter(service)


def configure_logging(
    service: str, level: str = "INFO", log_format: str = "auto", stream: TextIO | None = None
) -> None:
    """Install the handler on the root logger (called once, from ``__main__``)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(choose_formatter(service, log_format, stream))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log duplicates ours (service_middleware logs every request).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Even at DEBUG, no log line may carry a bound SQL value: password hashes, refresh-token
    # hashes. The engines hide them from SQL errors (hide_parameters, shared.db.database);
    # aiosqlite logs every call with its arguments at DEBUG; SQLAlchemy's engine, were its
    # logger let through, logs statements at INFO and their result rows (the password hash
    # read at sign-in) at DEBUG.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
