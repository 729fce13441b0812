"""The web page's refresh token, kept in cookies JavaScript cannot read.

A browser page asks for cookie mode at sign-in (``"cookie": true``). Its refresh token
then never appears in a response body: it travels in ``vod_refresh``, beside a random
device id in ``vod_device``, both

- ``HttpOnly``: no script on the page (nor one injected into it) can read them;
- ``SameSite=Strict``: a request another site starts, even a top-level navigation,
  carries neither;
- ``Path=/api/v1/sessions``: sent to sign-in, refresh and sign-out only, never with a
  stream or an upload;
- ``Secure`` when the page was served over https: the gateway says so in
  ``X-Forwarded-Proto`` (it overwrites whatever a client sent), or ``VOD_SECURE_COOKIES``
  does when TLS ends at a balancer in front of the gateway, which then sees plain http.

The family's tokens record the SHA-256 of the device id, so a refresh token presented
without its device cookie (copied out of the browser, replayed from elsewhere) is refused
and its family revoked. API clients (the CLI, tus, scripts) keep the JSON body flow.

Both cookies are re-sent with every refresh, so they live as long as the family does, and
a new sign-in mints a new device id: a device cookie planted in the browser beforehand is
never adopted. Sign-out clears both.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from api_service.services.sessions import TokenPair
from shared.errors import ForbiddenError
from shared.web import SETTINGS

REFRESH_COOKIE: Final = "vod_refresh"
DEVICE_COOKIE: Final = "vod_device"
COOKIE_PATH: Final = "/api/v1/sessions"
# The longest value worth reading: the service mints 43-character ids and tokens.
COOKIE_VALUE_MAX: Final = 256

# The one Sec-Fetch-Site value under which a browser may use the cookies: the page itself
# (a client that is not a browser sends no Sec-Fetch-Site at all).
_SAME_ORIGIN: Final = "same-origin"


def cookie_value(request: web.Request, name: str) -> str | None:
    """The cookie's value, or None when absent, empty or too long to be one of ours."""
    value = request.cookies.get(name)
    if not value or len(value) > COOKIE_VALUE_MAX:
        return None
    return value


def refuse_cross_site(request: web.Request) -> None:
    """403 for a browser request another origin made, cookies or not.

    SameSite=Strict keeps other *sites* from sending the cookies, but a sibling host of
    the same site (another subdomain) still sends them; the browser's ``Sec-Fetch-Site``
    tells the two apart and cannot be set by a script.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != _SAME_ORIGIN:
        raise ForbiddenError(
            "The session cookies are only used by requests from this site's own page.",
            code="cross_site_request",
        )


def _secure(request: web.Request) -> bool:
    return (
        request.app[SETTINGS].secure_cookies or request.headers.get("X-Forwarded-Proto") == "https"
    )


def set_session_cookies(
    request: web.Request, response: web.StreamResponse, pair: TokenPair, device_id: str
) -> None:
    """``pair``'s refresh token and the device id it is bound to as cookies on ``response``."""
    secure = _secure(request)
    for name, value in ((REFRESH_COOKIE, pair.refresh_token), (DEVICE_COOKIE, device_id)):
        response.set_cookie(
            name,
            value,
            max_age=pair.refresh_expires_in,
            path=COOKIE_PATH,
            secure=secure,
            httponly=True,
            samesite="Strict",
        )


def clear_session_cookies(request: web.Request, response: web.StreamResponse) -> None:
    """Tells the browser to forget both cookies (a no-op for a client that keeps none)."""
    secure = _secure(request)
    for name in (REFRESH_COOKIE, DEVICE_COOKIE):
        response.del_cookie(name, path=COOKIE_PATH, secure=secure, httponly=True, samesite="Strict")
