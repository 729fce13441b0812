"""The routing table: which upstream service answers which public path.

The table is data, matched by aiohttp's router: every entry becomes one route of the
gateway, so the route label on metrics and logs is the entry's template (bounded
cardinality), and anything under ``/api/v1`` that no entry matches is the router's 404,
which the shared error middleware renders as a ``route_not_found`` problem document.
To send a new family of paths somewhere, add one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Service = Literal["api", "stream", "scheduler"]

API_PREFIX: Final = "/api/v1"

# Matches nothing or "/" followed by anything: "/api/v1/users", "/api/v1/users/me", ...
_OPTIONAL_TAIL: Final = "{tail:(/.*)?}"


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """One family of public paths and the upstream service that answers it."""

    name: str
    path: str
    service: Service
    # Requests carrying "Upgrade: websocket" are bridged as WebSockets only on these.
    websocket: bool = False
    # Cookie and Set-Cookie cross the gateway only on these (gateway.proxy.headers).
    cookies: bool = False


def _family(
    name: str, path: str, service: Service, *, websocket: bool = False, cookies: bool = False
) -> ProxyRoute:
    """``path`` itself and everything below it."""
    return ProxyRoute(name, API_PREFIX + path + _OPTIONAL_TAIL, service, websocket, cookies)


def _exact(name: str, path: str, service: Service) -> ProxyRoute:
    return ProxyRoute(name, API_PREFIX + path, service)


ROUTE_TABLE: Final[tuple[ProxyRoute, ...]] = (
    _family("users", "/users", "api"),
    # The web page's refresh token and device id (api_service.session_cookies).
    _family("sessions", "/sessions", "api", cookies=True),
    _exact("videos", "/videos", "api"),
    _exact("video", "/videos/{id}", "api"),
    _family("video_comments", "/videos/{id}/comments", "api"),
    _family("video_danmaku", "/videos/{id}/danmaku", "api"),
    _family("video_live", "/videos/{id}/live", "api", websocket=True),
    _exact("video_stream", "/videos/{id}/stream", "stream"),
    _exact("video_thumbnail", "/videos/{id}/thumbnail", "stream"),
    _family("uploads", "/uploads", "stream"),
    _family("tus", "/tus", "stream"),
    _family("admin", "/admin", "scheduler"),
)

SERVICES: Final[tuple[Service, ...]] = ("api", "stream", "scheduler")
