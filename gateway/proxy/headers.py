"""Which headers cross the gateway, in each direction.

End-to-end headers pass untouched (``Range``, ``If-Range``, ``Content-Range``,
``Accept-Ranges``, ``ETag``, ``Content-Length``, ``Content-Encoding``, ...). Cookies pass
only where the routing table says (the sessions routes, for the web page's refresh
token): elsewhere a client's ``Cookie`` is dropped, and so is an upstream's
``Set-Cookie``, so no other route can read the session cookies or set a cookie at all.
Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and never cross. Headers
that carry trust between the gateway and its upstreams are only ever set by the gateway:
a client sending them is ignored, whatever it sent.
"""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from shared.auth import IDENTITY_HEADERS, Identity
from shared.web import INTERNAL_TOKEN_HEADER, REQUEST_ID, REQUEST_ID_HEADER

# Every header under this prefix is reserved for gateway → upstream signalling.
RESERVED_PREFIX: Final = "x-vod-"

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
    }
)

# Set by the gateway alone, from what it knows; a client's values are dropped. The
# gateway is the public edge, so a forwarding chain a client sends cannot be verified.
_GATEWAY_OWNED: Final = frozenset(
    {
        *(name.lower() for name in IDENTITY_HEADERS),
        INTERNAL_TOKEN_HEADER.lower(),
        REQUEST_ID_HEADER.lower(),
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    }
)

# Host names the upstream (aiohttp sets it from the URL); the gateway already answered any
# "Expect: 100-continue" itself, so the upstream must not make the body wait a second time.
_REQUEST_ONLY_DROPPED: Final = frozenset({"host", "expect"})

# The client's WebSocket handshake belongs to the client ↔ gateway hop; the gateway makes
# its own handshake with the upstream (subprotocols are passed separately).
_WEBSOCKET_HANDSHAKE: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    }
)

# An upstream has no business telling a client the shared secret, even by mistake.
_RESPONSE_DROPPED: Final = frozenset({INTERNAL_TOKEN_HEADER.lower()})

# The CORS policy is the gateway's alone (``gateway.cors`` adds its own headers): an
# upstream's ``Access-Control-*`` headers never reach a client, whether CORS is on or off.
CORS_HEADER_PREFIX: Final = "access-control-"

# The unions each direction drops, built once rather than on every request.
_REQUEST_DROPPED: Final = HOP_BY_HOP | _GATEWAY_OWNED | _REQUEST_ONLY_DROPPED
_WEBSOCKET_REQUEST_DROPPED: Final = _REQUEST_DROPPED | _WEBSOCKET_HANDSHAKE
_RESPONSE_HOP_DROPPED: Final = HOP_BY_HOP | _RESPONSE_DROPPED
# The same on routes without cookies (every route but the sessions').
_REQUEST_DROPPED_NO_COOKIES: Final = _REQUEST_DROPPED | {"cookie"}
_WEBSOCKET_REQUEST_DROPPED_NO_COOKIES: Final = _WEBSOCKET_REQUEST_DROPPED | {"cookie"}
_RESPONSE_HOP_DROPPED_NO_COOKIES: Final = _RESPONSE_HOP_DROPPED | {"set-cookie"}


def _dropped(headers: CIMultiDictProxy[str], fixed: frozenset[str]) -> frozenset[str]:
    """``fixed`` plus the names the sender declared hop-by-hop in its Connection header."""
    if hdrs.CONNECTION not in headers:  # the usual case: nothing to parse
        return fixed
    return fixed | frozenset(
        token.strip().lower()
        for value in headers.getall(hdrs.CONNECTION, ())
        for token in value.split(",")
        if token.strip()
    )


def upstream_request_headers(
    request: web.Request,
    *,
    internal_token: str,
    identity: Identity | None,
    websocket: bool = False,
    cookies: bool = False,
) -> CIMultiDict[str]:
    """The headers to send upstream for ``request``; its ``Cookie`` only if ``cookies``."""
    if websocket:
        fixed = _WEBSOCKET_REQUEST_DROPPED if cookies else _WEBSOCKET_REQUEST_DROPPED_NO_COOKIES
    else:
        fixed = _REQUEST_DROPPED if cookies else _REQUEST_DROPPED_NO_COOKIES
    dropped = _dropped(request.headers, fixed)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lowered = name.lower()
        if lowered in dropped or lowered.startswith(RESERVED_PREFIX):
            continue
        headers.add(name, value)
    # add, not set: every one of these names was dropped above, none can be present.
    headers.add(INTERNAL_TOKEN_HEADER, internal_token)
    headers.add(REQUEST_ID_HEADER, request[REQUEST_ID])
    if request.remote:
        headers.add("X-Forwarded-For", request.remote)
    headers.add("X-Forwarded-Proto", request.scheme)
    headers.add("X-Forwarded-Host", request.host)
    if identity is not None:
        headers.extend(identity.to_headers())
    return headers


def client_response_headers(
    upstream_headers: CIMultiDictProxy[str], *, cookies: bool = False
) -> CIMultiDict[str]:
    """The upstream response's headers that go on to the client; ``Set-Cookie`` only if
    ``cookies``."""
    dropped = _dropped(
        upstream_headers, _RESPONSE_HOP_DROPPED if cookies else _RESPONSE_HOP_DROPPED_NO_COOKIES
    )
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream_headers.items():
        lowered = name.lower()
        if lowered not in dropped and not lowered.startswith(CORS_HEADER_PREFIX):
            headers.add(name, value)
    return headers
