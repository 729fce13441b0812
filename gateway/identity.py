"""Who is calling: the one place where the gateway decides a request's identity.

Upstreams trust the ``X-User-*`` / ``X-Token-*`` headers only because the gateway strips
whatever a client sent under those names and sets them solely from what ``authenticate``
returns: a token whose signature (Ed25519, algorithm pinned), ``exp``, ``iat``, ``iss``
and ``aud`` check out, and that is not on the revocation list in Redis.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from shared.auth import Identity, TokenVerifier, revoked_family_key, revoked_token_key
from shared.errors import UnauthorizedError
from shared.kv import KeyValueStore

# Browsers cannot set headers on a WebSocket handshake, so the live channel may carry the
# access token in the query string instead; the gateway removes it before forwarding.
ACCESS_TOKEN_PARAM = "access_token"  # noqa: S105 - a query parameter name


class Authenticator:
    def __init__(self, verifier: TokenVerifier, kv: KeyValueStore) -> None:
        self._verifier = verifier
        self._kv = kv

    async def authenticate(self, request: web.Request, *, websocket: bool) -> Identity | None:
        """The verified caller, None when no token was presented, 401 for a bad one.

        A bad token is refused even on public routes: a client that believes it is signed
        in must learn that it is not, rather than silently act as a stranger.
        """
        token = _bearer_token(request)
        if token is None and websocket:
            token = request.query.get(ACCESS_TOKEN_PARAM) or None
        if token is None:
            return None
        identity = self._verifier.verify(token)
        revoked = await self._kv.exists(revoked_token_key(identity.token_id)) or (
            await self._kv.exists(revoked_family_key(identity.family_id))
        )
        if revoked:
            raise UnauthorizedError("This session has been signed out.", code="token_revoked")
        return identity


def _bearer_token(request: web.Request) -> str | None:
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError(
            "Send the access token as 'Authorization: Bearer <token>'.", code="token_invalid"
        )
    return token.strip()
