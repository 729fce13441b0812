"""Which log format a process writes (a person's terminal or a machine's pipe), and what a
request's line says in each."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from shared.logging import configure_logging, request_id_var
from shared.settings import STANDALONE_DEFAULTS, Settings

REQUEST_ID = "0123456789abcdef00000000deadbeef"
TEXT_REQUEST_LINE = re.compile(r"^\d\d:\d\d:\d\d gateway GET /api/v1/videos 200 3ms rid=deadbeef$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def log_a_request(stream: io.StringIO, log_format: str) -> str:
    """What a process configured with ``log_format`` writes to ``stream`` for one request
    line (as the service middleware logs it) and one warning."""
    configure_logging("standalone", "INFO", log_format, stream)
    token = request_id_var.set(REQUEST_ID)
    try:
        logging.getLogger("shared.web").info(
            "%s %s %s",
            "GET",
            "/api/v1/videos",
            200,
            extra={"service": "gateway", "route": "/api/v1/videos", "status": 200, "ms": 2.7},
        )
    finally:
        request_id_var.reset(token)
    logging.getLogger("shared.runner").warning("2 request(s) still in flight")
    return stream.getvalue()


def test_a_terminal_gets_one_short_line_per_request() -> None:
    request, warning = log_a_request(Terminal(), "auto").splitlines()
    assert TEXT_REQUEST_LINE.match(request), request
    assert re.match(r"^\d\d:\d\d:\d\d standalone WARNING 2 request\(s\) still in flight$", warning)


@pytest.mark.parametrize(
    ("stream", "log_format"),
    [(io.StringIO(), "auto"), (Terminal(), "json"), (io.StringIO(), "json")],
    ids=["not-a-terminal", "terminal-but-json", "json"],
)
def test_a_pipe_or_vod_log_format_json_gets_json_lines(
    stream: io.StringIO, log_format: str
) -> None:
    request, warning = (json.loads(line) for line in log_a_request(stream, log_format).splitlines())
    assert request["service"] == "gateway"
    assert request["msg"] == "GET /api/v1/videos 200"
    assert (request["status"], request["ms"], request["request_id"]) == (200, 2.7, REQUEST_ID)
    assert (warning["service"], warning["level"]) == ("standalone", "WARNING")


def test_vod_log_format_text_gets_text_when_not_a_terminal() -> None:
    request = log_a_request(io.StringIO(), "text").splitlines()[0]
    assert TEXT_REQUEST_LINE.match(request), request


def test_the_log_format_setting_defaults_to_auto_and_reads_vod_log_format() -> None:
    assert Settings.from_env({}, defaults=STANDALONE_DEFAULTS).log_format == "auto"
    settings = Settings.from_env({"VOD_LOG_FORMAT": "JSON"}, defaults=STANDALONE_DEFAULTS)
    assert settings.log_format == "json"
